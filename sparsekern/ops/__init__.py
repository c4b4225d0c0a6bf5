"""Sparse matmul and conv ops: registration (library), reference, backends and dispatch."""
from sparsekern.ops import backends, library, reference
from sparsekern.ops.conv import conv_geometry, sparse_conv2d
from sparsekern.ops.backends import BACKENDS, select_backend
from sparsekern.ops.dispatch import sparse_linear

__all__ = ["backends", "library", "reference", "BACKENDS", "select_backend", "sparse_linear", "sparse_conv2d",
           "conv_geometry"]
