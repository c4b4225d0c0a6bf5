"""Drop-in sparse layers."""
from sparsekern.nn.conv import SparseConv2d
from sparsekern.nn.linear import SparseLinear

__all__ = ["SparseLinear", "SparseConv2d"]
