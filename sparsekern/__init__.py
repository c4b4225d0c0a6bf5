"""sparsekern: genuinely sparse (CSR/BSR) weights for PyTorch, forward and backward.

Public API:
    SparseLinear                 drop-in nn.Linear with a CSR/BSR weight
    SparseConv2d                 drop-in nn.Conv2d with a CSR/BSR weight
    sparsify, densify            swap every nn.Linear/nn.Conv2d of a model for its sparse twin and back
    dst.RigL, dst.SET, dst.Static dynamic sparse training that rewires the indices in place
    methods                      the papers' methods: SupTickets, EDST/TicketEnsemble, trainable thresholds,
                                 the gradient-flow study
    CSRTopology, BSRTopology     sparse weight containers (values + indices + transpose)
    sparse_linear                functional y = x W^T + b
    sparse_conv2d, conv_geometry functional conv with a sparse weight
    select_backend, BACKENDS     which kernel runs where, and why not
"""
from sparsekern import _ext
from sparsekern._version import __version__
from sparsekern.formats import BSRTopology, CSRTopology, SparseTopology, check_structure
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.ops import BACKENDS, conv_geometry, select_backend, sparse_conv2d, sparse_linear
from sparsekern.sparsify import SparsityReport, densify, sparsify
from sparsekern import dst  # noqa: E402  (needs nn)
from sparsekern import methods  # noqa: E402  (needs dst)

extension_available = _ext.available

__all__ = [
    "SparseLinear", "SparseConv2d", "CSRTopology", "BSRTopology", "SparseTopology", "check_structure",
    "sparse_linear", "sparse_conv2d", "conv_geometry", "select_backend", "BACKENDS", "extension_available",
    "sparsify", "densify", "SparsityReport", "dst", "methods",
]
