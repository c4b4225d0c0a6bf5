"""sparsekern: genuinely sparse (CSR/BSR) weights for PyTorch, forward and backward.

Public API:
    SparseLinear                 drop-in nn.Linear with a CSR/BSR weight
    CSRTopology, BSRTopology     sparse weight containers (values + indices + transpose)
    sparse_linear                functional y = x W^T + b
    select_backend, BACKENDS     which kernel runs where, and why not
"""
from sparsekern import _ext
from sparsekern.formats import BSRTopology, CSRTopology, SparseTopology, check_structure
from sparsekern.nn import SparseLinear
from sparsekern.ops import BACKENDS, select_backend, sparse_linear

__version__ = "0.1.0"
extension_available = _ext.available

__all__ = [
    "SparseLinear", "CSRTopology", "BSRTopology", "SparseTopology", "check_structure",
    "sparse_linear", "select_backend", "BACKENDS", "extension_available",
]
