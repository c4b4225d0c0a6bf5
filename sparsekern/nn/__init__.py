"""Drop-in sparse layers."""
from sparsekern.nn.linear import SparseLinear

__all__ = ["SparseLinear"]
