"""The contenders of ``bench_models_cpu.py``: one model turned into its sparse versions.

Every function here copies a model (or swaps layers of a copy) and never prunes by itself:
the magnitude pruning is ``SparseLinear.from_dense(density=...)``'s, the masked-dense twin is
``sparsekern.densify``'s, the torch.sparse weights are the topology's own ``to_torch_sparse``.

* :func:`magnitude_prune`: the named ``nn.Linear`` layers -> ``sparsekern.SparseLinear``, each
  one-shot magnitude-pruned to the density (CSR, or BSR blocks by L2 norm).
* :func:`masked_dense`: a sparse model's dense twin (``nn.Linear``/``nn.Conv2d`` holding zeros off
  the topology); it computes what the sparse model computes, with dense kernels.
* :class:`TorchSparseLinear`, :func:`to_torch_sparse`: the same nonzeros as a ``torch.sparse``
  CSR weight through ``torch.sparse.mm`` (autograd reaches the values).
* :func:`sparseprop_module`, :func:`to_sparseprop`: SparseProp's ``SparseLinear``/``SparseConv2d``
  (IST-DASLab, ``pip install sparseprop``) over the same nonzeros, when it is installed.
"""
from __future__ import annotations

import copy
import fnmatch

import torch
from torch import nn

import sparsekern as sk
from sparsekern.formats import CSRTopology
from sparsekern.sparsify import _replace

import _sparseprop_peer

_SPARSE = (sk.SparseLinear, sk.SparseConv2d)


def swap(model: nn.Module, new: dict[str, nn.Module]) -> nn.Module:
    """Point every reference to the modules named in ``new`` (name -> replacement) at the
    replacement, in place (sparsify's own replacement, shared references too); returns ``model``."""
    _replace(model, {id(model.get_submodule(n)): m for n, m in new.items()})
    return model


def magnitude_prune(model: nn.Module, density: float, layout: str = "csr", block_size: int | None = None,
                    include: str = "*") -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers named by the fnmatch pattern ``include``
    are ``sparsekern.SparseLinear``, each keeping its own round(density * numel) largest-magnitude
    weights (CSR) or blocks by L2 norm (BSR); everything else is copied unchanged.

    Raises ``ValueError`` when ``include`` matches no ``nn.Linear``.
    """
    out = copy.deepcopy(model)
    names = [n for n, m in out.named_modules() if isinstance(m, nn.Linear) and fnmatch.fnmatch(n, include)]
    if not names:
        raise ValueError(f"no nn.Linear of the model matches {include!r}")
    return swap(out, {n: sk.SparseLinear.from_dense(out.get_submodule(n), density=density, layout=layout,
                                                    block_size=block_size) for n in names})


def sparse_names(model: nn.Module) -> list[str]:
    """Names of the sparsekern ``SparseLinear``/``SparseConv2d`` layers of ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, _SPARSE)]


def masked_dense(sparse_model: nn.Module) -> nn.Module:
    """A copy of ``sparse_model`` with every sparse layer back as its dense ``nn`` module holding
    zeros off the topology (``sparsekern.densify``)."""
    out = copy.deepcopy(sparse_model)
    sk.densify(out)
    return out


class TorchSparseLinear(nn.Module):
    """y = x W^T + b with W a ``torch.sparse`` CSR tensor [out, in], through ``torch.sparse.mm``.

    ``values`` (float32 [nnz]) and ``bias`` ([out] or None) are parameters; ``crow_indices``
    (int32 [out + 1]) and ``col_indices`` (int32 [nnz]) are buffers. The CSR tensor is built from
    them at every call, so autograd reaches ``values`` (torch.sparse's own backward).

    Shapes: x float [..., in] -> float [..., out].
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if weight.layout != torch.sparse_csr:
            raise TypeError(f"weight must be a torch.sparse_csr tensor, got {weight.layout}")
        self.shape = tuple(weight.shape)
        self.register_buffer("crow_indices", weight.crow_indices().clone())
        self.register_buffer("col_indices", weight.col_indices().clone())
        self.values = nn.Parameter(weight.values().detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_sparse(cls, layer: sk.SparseLinear) -> "TorchSparseLinear":
        """The same nonzeros and values as ``layer`` (a BSR layer's blocks become CSR entries)."""
        topo = layer.topology
        if topo.layout != "csr":
            topo = CSRTopology.from_mask(topo.mask(), topo.to_dense())
        return cls(topo.to_torch_sparse(), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, self.shape,
                                    check_invariants=False)     # built from a validated topology
        y = torch.sparse.mm(w, x.reshape(-1, self.shape[1]).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.shape[0])


def to_torch_sparse(sparse_model: nn.Module) -> nn.Module:
    """A copy of ``sparse_model`` with every ``SparseLinear`` a :class:`TorchSparseLinear`.

    Raises ``TypeError`` when the model has a ``SparseConv2d`` (torch.sparse has no sparse conv)."""
    out = copy.deepcopy(sparse_model)
    new = {}
    for n in sparse_names(out):
        m = out.get_submodule(n)
        if not isinstance(m, sk.SparseLinear):
            raise TypeError(f"layer {n!r} is a {type(m).__name__}: torch.sparse has no sparse convolution")
        new[n] = TorchSparseLinear.from_sparse(m)
    return swap(out, new)


def sparseprop_module():
    """``(sparseprop.modules, None)``, or ``(None, why)`` when SparseProp cannot be imported."""
    return _sparseprop_peer.load()


def _check_sparseprop_conv(name: str, conv: nn.Conv2d) -> None:
    """A ``ValueError`` naming the layer when SparseProp's SparseConv2d does not apply to it."""
    gaps = _sparseprop_peer.conv_gaps(conv)
    if gaps:
        raise ValueError(f"layer {name!r} ({conv}) is outside SparseProp's SparseConv2d: no {', '.join(gaps)}")


def to_sparseprop(sparse_model: nn.Module, spm) -> nn.Module:
    """The masked-dense copy of ``sparse_model`` with every layer that is sparse there turned
    into SparseProp's ``SparseLinear``/``SparseConv2d`` (``spm`` = ``sparseprop.modules``) over
    the same nonzeros; layers dense in ``sparse_model`` stay dense. SparseProp runs float32."""
    names = sparse_names(sparse_model)
    out = masked_dense(sparse_model)
    new = {}
    for n in names:
        m = out.get_submodule(n)
        if isinstance(m, nn.Conv2d):
            _check_sparseprop_conv(n, m)
            new[n] = spm.SparseConv2d.from_dense(m)
        else:
            new[n] = spm.SparseLinear.from_dense(m)
    return swap(out, new)
