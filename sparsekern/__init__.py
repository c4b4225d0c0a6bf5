"""sparsekern: genuinely sparse (CSR/BSR) weights for PyTorch, forward and backward.

Public API:
    SparseLinear                 drop-in nn.Linear with a CSR/BSR weight
    SparseConv2d                 drop-in nn.Conv2d with a CSR/BSR weight
    SparseConv1D                 drop-in HF transformers Conv1D (GPT-2's projections)
    SparseMultiheadAttention     nn.MultiheadAttention's contract with sparse q/k/v/out projections
    SparseWeight                 what ``layer.weight`` returns: a tensor view of the topology
    sparsify, densify            swap every supported matmul layer of a model for its sparse twin and back
    from_pretrained              rebuild a sparsified Hugging Face model saved with save_pretrained
    dst.RigL, dst.SET, dst.Static dynamic sparse training that rewires the indices in place
    methods                      the papers' methods: SupTickets, EDST/TicketEnsemble, trainable thresholds,
                                 the gradient-flow study
    CSRTopology, BSRTopology     sparse weight containers (values + indices + transpose)
    sparse_linear                functional y = x W^T + b
    sparse_conv2d, conv_geometry functional conv with a sparse weight
    select_backend, BACKENDS     which kernel runs where, and why not
    cpu_kernel_variant           which build of the CPU kernels this CPU runs (AVX-512, AVX2, base)
    cpu_bf16_dot_supported       whether the bf16 CPU kernels use AVX512-BF16 dot products here
"""
from sparsekern import _ext
from sparsekern._version import __version__
from sparsekern.formats import BSRTopology, CSRTopology, SparseTopology, check_structure
from sparsekern.nn import SparseConv1D, SparseConv2d, SparseLinear, SparseMultiheadAttention, SparseWeight
from sparsekern.ops import BACKENDS, conv_geometry, select_backend, sparse_conv2d, sparse_linear
from sparsekern.sparsify import SparsityReport, densify, sparsify
from sparsekern.hf import from_pretrained
from sparsekern import dst  # noqa: E402  (needs nn)
from sparsekern import methods  # noqa: E402  (needs dst)

extension_available = _ext.available
cpu_kernel_variant = _ext.cpu_variant
cpu_bf16_dot_supported = _ext.cpu_bf16_dot_supported

__all__ = [
    "SparseLinear", "SparseConv2d", "SparseConv1D", "SparseMultiheadAttention", "SparseWeight",
    "from_pretrained", "CSRTopology", "BSRTopology", "SparseTopology", "check_structure",
    "sparse_linear", "sparse_conv2d", "conv_geometry", "select_backend", "BACKENDS", "extension_available",
    "cpu_kernel_variant", "cpu_bf16_dot_supported",
    "sparsify", "densify", "SparsityReport", "dst", "methods",
]
