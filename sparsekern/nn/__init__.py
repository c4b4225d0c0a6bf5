"""Drop-in sparse layers."""
from sparsekern.nn.attention import SparseMultiheadAttention
from sparsekern.nn.conv import SparseConv2d
from sparsekern.nn.conv1d import SparseConv1D
from sparsekern.nn.linear import SparseLinear
from sparsekern.nn.weight import SparseWeight

__all__ = ["SparseLinear", "SparseConv2d", "SparseConv1D", "SparseMultiheadAttention", "SparseWeight"]
