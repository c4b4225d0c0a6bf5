"""Sparse matmul and conv ops: registration (library), reference and dispatch."""
from sparsekern.ops import library, reference
from sparsekern.ops.conv import conv_geometry, sparse_conv2d
from sparsekern.ops.dispatch import BACKENDS, select_backend, sparse_linear

__all__ = ["library", "reference", "BACKENDS", "select_backend", "sparse_linear", "sparse_conv2d",
           "conv_geometry"]
