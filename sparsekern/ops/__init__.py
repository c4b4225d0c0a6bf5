"""Sparse matmul ops: registration (library), reference and dispatch."""
from sparsekern.ops import library, reference
from sparsekern.ops.dispatch import BACKENDS, select_backend, sparse_linear

__all__ = ["library", "reference", "BACKENDS", "select_backend", "sparse_linear"]
