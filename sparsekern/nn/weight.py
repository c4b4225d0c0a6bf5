"""``layer.weight`` of the sparse layers: a tensor that reads as the dense weight and stores nothing.

``SparseLinear.weight``, ``SparseConv2d.weight`` and ``SparseConv1D.weight`` return a
:class:`SparseWeight`: a ``torch.Tensor`` subclass with no storage of its own (a
``_make_wrapper_subclass``) over the layer's topology (``layer.topology``, a
:class:`~sparsekern.formats.CSRTopology`/``BSRTopology``) and its stored values
(``layer.topology.values``, the only parameter). It is built on each access; nothing is
copied, and no dense weight-sized tensor is ever formed unless asked for (``to_dense()``).

What reads as the dense weight:

* metadata: ``shape``/``size()`` (``nn.Linear``'s ``[out, in]``, ``nn.Conv2d``'s
  ``[out, in/groups, kh, kw]``, HF ``Conv1D``'s ``[in, out]``), ``ndim``/``dim()``, ``numel()``,
  ``dtype``, ``device``, ``requires_grad`` (read and set: it sets the values'), ``is_cuda``...;
* products, run by the sparse kernels with autograd into the values: ``F.linear(x, w, b)``,
  ``x @ w.T``, ``torch.matmul``/``mm``/``addmm`` with ``w.T`` on the right or ``w`` on the
  left, ``F.conv2d(x, conv.weight, b, stride, padding, dilation, groups)``;
* ``w.T``/``w.t()``/``w.mT``/``w.transpose(0, 1)`` (2-D): a view with a transpose flag;
* ``w.grad`` (a view over ``values.grad``), ``w.data``, ``w.detach()``, ``w.to_dense()``
  (an explicit dense copy, for inspection);
* initialisers, as ``nn.init`` runs them: ``uniform_``, ``normal_``, ``fill_``, ``zero_``, the
  other random draws and ``copy_`` from a view of the same topology set every *stored*
  value. So ``nn.init.xavier_uniform_``/``kaiming_*_``/``normal_``/``trunc_normal_``/
  ``constant_``/``zeros_``/``ones_`` work, their fan taken from the dense shape; positions
  outside the topology are structural zeros and stay zero;
* element-wise ops (``torch.Tag.pointwise``) between views of one topology and scalars, and
  the full reductions ``any``/``all``/``sum``, when they map 0 to 0 (checked on a zero):
  then acting on the stored values is exactly the dense result. Out of place, they are
  inspection only: under grad mode with values that require grad they raise, since no
  gradient would reach the values.

Everything else raises a :class:`SparseWeightError` (a ``RuntimeError``) naming the
operation: it would need every position of the dense weight (``w + 1``, ``exp``, indexing,
``nn.init.eye_``/``dirac_``/``orthogonal_``/``sparse_``, ``copy_`` from a dense tensor,
``x @ w`` with the untransposed weight on the right, ``.to()`` another dtype or device: move
the module instead).

Why a wrapper subclass and not a ``torch.sparse_csr``/``sparse_bsr`` tensor over the same
values: torch would run its own sparse kernels for ``F.linear`` (or refuse), it has no 4-D
sparse layout for a conv weight, and it cannot refuse, by name, what needs the dense weight.

Limits: assigning ``layer.weight`` raises (so no tie to another module's weight: ``sparsify``
keeps tied layers dense); the view is not an ``nn.Parameter`` (``model.parameters()`` holds
``topology.values``) and ``layer.weight is layer.weight`` is False; an ``nn.init`` function
that raises part-way (``dirac_`` zeroes and ``sparse_`` draws before they index;
``trunc_normal_`` with an interval holding under 30% of the mass takes a log of its scratch
draws) has written the stored values already. The state_dict holds ``topology.*``; keys of
the last version, when the topology itself was the module ``weight`` (``weight.values`` ...), are
renamed on load (:func:`sparsekern.nn._common.rename_legacy_keys`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

aten = torch.ops.aten
_INIT_PACKETS = {aten.fill_, aten.zero_, aten.copy_}
_LIKE_PACKETS = {aten.empty_like: torch.empty_like, aten.zeros_like: torch.zeros_like}
_REDUCTIONS = {aten.any.default, aten.all.default, aten.sum.default}
_ALIASES = {aten.detach.default, aten.alias.default}


class SparseWeightError(RuntimeError):
    """An operation that a sparse weight view cannot do without the dense weight (or without
    losing the gradient). Not a ``TypeError``: torch turns those into ``NotImplemented`` for
    operators (``w + 1``), which would hide the reason."""


class Operand(NamedTuple):
    """What the functional ops read from a weight: stored values, the [rows, cols] shape of the
    stored matrix, and the five index tensors (see :meth:`SparseTopology.topology`)."""
    values: torch.Tensor
    shape: tuple[int, int]
    index: tuple[torch.Tensor, ...]

    def topology(self) -> tuple[torch.Tensor, ...]:
        return self.index


def _flat(args, kwargs):
    out = []
    for a in (*args, *kwargs.values()):
        out.extend(a if isinstance(a, (list, tuple)) else (a,))
    return out


def _swap(args, kwargs, fn):
    """args and kwargs with every tensor (also inside lists/tuples) replaced by fn(tensor)."""
    def one(a):
        if isinstance(a, (list, tuple)):
            return type(a)(one(x) for x in a)
        return fn(a) if isinstance(a, torch.Tensor) else a
    return [one(a) for a in args], {k: one(v) for k, v in kwargs.items()}


class SparseWeight(torch.Tensor):
    """A sparse layer's weight as a tensor (see the module doc for what works and what raises).

    Args:
        topology: the layer's ``CSRTopology``/``BSRTopology`` (stored matrix [rows, cols]).
        shape: the dense weight's shape (default ``topology.shape``; ``nn.Conv2d``'s 4-D shape
            for a convolution, whose product of trailing dims is ``cols``).
        transposed: the tensor is the stored matrix's transpose (shape reversed; 2-D only).
        values: the stored values to present (default ``topology.values``; ``values.grad``
            for ``.grad``), float [nnz] or [nnzb, b, b].
        backend: the kernels' backend for products (the layer's).
    """

    @staticmethod
    def __new__(cls, topology, shape=None, *, transposed: bool = False, values=None, backend: str = "auto"):
        values = topology.values if values is None else values
        dense = tuple(topology.shape) if shape is None else tuple(int(s) for s in shape)
        if transposed and len(dense) != 2:
            raise ValueError(f"only a 2-D weight can be transposed, got shape {dense}")
        logical = dense[::-1] if transposed else dense
        t = torch.Tensor._make_wrapper_subclass(cls, logical, dtype=values.dtype, device=values.device,
                                                requires_grad=values.requires_grad)
        t._topology, t._values, t._dense, t._transposed, t._backend = (
            topology, values, dense, transposed, backend)
        return t

    def __init__(self, *args, **kwargs):      # everything happens in __new__
        super().__init__()

    def _with(self, **change) -> SparseWeight:
        kw = dict(shape=self._dense, transposed=self._transposed, values=self._values, backend=self._backend)
        kw.update(change)
        return SparseWeight(self._topology, **kw)

    # ---------------------------------------------------------------- plain attributes
    @property
    def topology(self):
        """The layer's ``CSRTopology``/``BSRTopology`` module (indices, and ``values``)."""
        return self._topology

    @property
    def sparse_layout(self) -> str:
        """"csr" or "bsr" (``.layout`` stays ``torch.strided``: the view has no sparse storage)."""
        return self._topology.layout

    @property
    def nnz(self) -> int:
        """Stored scalar values (nnzb * b * b for BSR)."""
        return self._values.numel()

    def sparse_operand(self) -> Operand:
        """(values, stored shape, index tensors) for the functional ops; untransposed only."""
        if self._transposed:
            raise SparseWeightError("this is the transposed weight W.T; the ops take W ([out, in]): use .T again")
        return Operand(self._values, tuple(self._topology.shape), self._topology.topology())

    def _describe(self) -> str:
        return (f"a {self.sparse_layout.upper()} sparse weight of shape {list(self.shape)} "
                f"({self.nnz} stored values{', transposed' if self._transposed else ''})")

    # ------------------------------------------------------------ torch functions
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _FUNCTIONS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        # metadata is answered from the wrapper; any data access reaches __torch_dispatch__
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        views = [a for a in _flat(args, kwargs) if isinstance(a, SparseWeight)]
        first = views[0]
        if func in _ALIASES:
            return first._with(values=first._values.detach())
        packet, tags = func.overloadpacket, func.tags
        inplace = torch.Tag.inplace in tags and bool(args) and isinstance(args[0], SparseWeight)
        if packet in _LIKE_PACKETS and args[0] is first:
            _check_others(func, first, views, args, kwargs, scalar_only=True)
            return first._with(values=_LIKE_PACKETS[packet](first._values, **kwargs))
        if inplace and (torch.Tag.nondeterministic_seeded in tags or packet in _INIT_PACKETS):
            # an initialiser: draw or set every stored value (copy_ from one topology, or a scalar)
            _check_others(func, first, views, args, kwargs, scalar_only=packet is not aten.copy_)
            return _apply_inplace(func, args, kwargs)
        if torch.Tag.pointwise in tags or func in _REDUCTIONS:
            _check_others(func, first, views, args, kwargs, scalar_only=False)
            _check_zero_preserving(func, args, kwargs)
            if inplace:
                return _apply_inplace(func, args, kwargs)
            a, k = _swap(args, kwargs, lambda t: t._values if isinstance(t, SparseWeight) else t)
            out = func(*a, **k)
            if out.is_floating_point() and torch.is_grad_enabled() and any(v._values.requires_grad for v in views):
                raise SparseWeightError(f"{func} on {first._describe()} is not differentiable through the view "
                                        f"(no gradient would reach the stored values): use "
                                        f"layer.topology.values, or run it under torch.no_grad() to inspect")
            if func is aten.all.default and first.nnz < first.numel():
                return torch.zeros_like(out)       # an unstored position is a zero: not all True
            return out if func in _REDUCTIONS else first._with(values=out)
        raise SparseWeightError(f"{func} on {first._describe()} would need every position of the dense weight, "
                                f"which a sparse layer does not store. Use layer.topology.values (the stored "
                                f"values), layer.weight.to_dense() (a dense copy), or keep the layer dense")

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"SparseWeight(shape={list(self.shape)}, layout={self.sparse_layout}, nnz={self.nnz}, "
                f"dtype={self.dtype}, device={self.device}"
                f"{', transposed' if self._transposed else ''}, requires_grad={self.requires_grad})")


def _check_others(func, first, views, args, kwargs, scalar_only):
    """Every view shares ``first``'s topology (or, scalar_only, there is no other view) and every
    plain tensor argument is 0-dim: anything else would need the dense weight."""
    for v in views:
        if v is first:
            continue
        if scalar_only or v._topology is not first._topology or v._transposed != first._transposed \
                or v._dense != first._dense or v._values.shape != first._values.shape:
            raise SparseWeightError(f"{func} between {first._describe()} and {v._describe()} needs the dense "
                                    f"weights: sparse weights combine only with views of the same topology")
    for a in _flat(args, kwargs):
        if isinstance(a, torch.Tensor) and not isinstance(a, SparseWeight) and a.dim() != 0:
            raise SparseWeightError(f"{func} between {first._describe()} and a dense tensor of shape "
                                    f"{list(a.shape)} needs the dense weight; only 0-dim tensors and scalars combine "
                                    f"with a sparse weight")


def _check_zero_preserving(func, args, kwargs):
    """Run ``func`` with every view replaced by a 0-dim zero: an op that does not map 0 to 0
    would change the positions outside the topology, so it is refused."""
    def zero(t):
        if isinstance(t, SparseWeight):
            return torch.zeros((), dtype=t.dtype)
        return t.detach().cpu()
    a, k = _swap(args, kwargs, zero)
    with torch.no_grad():
        r = func(*a, **k)
    if func is aten.all.default:
        return                           # all() is exact over the stored values and the count
    if isinstance(r, torch.Tensor) and bool((r != 0).any()):
        views = [t for t in _flat(args, kwargs) if isinstance(t, SparseWeight)]
        raise SparseWeightError(f"{func} on {views[0]._describe()} maps 0 to {r.item()}, so it would change every "
                                f"position outside the topology; it needs the dense weight")


def _apply_inplace(func, args, kwargs):
    target = args[0]
    a, k = _swap(args, kwargs, lambda t: t._values if isinstance(t, SparseWeight) else t)
    func(*a, **k)
    torch.autograd.graph.increment_version(target._values)    # dispatch runs below the version counter
    return target


# ----------------------------------------------------------------------- handlers
def _linear(input, weight, bias=None):
    from sparsekern.ops.dispatch import sparse_linear
    if isinstance(input, SparseWeight) or isinstance(bias, SparseWeight) or not isinstance(weight, SparseWeight):
        raise SparseWeightError("F.linear with a sparse weight takes it as `weight` only (dense input and bias)")
    if weight.dim() != 2:
        raise SparseWeightError(f"F.linear needs a 2-D weight, got {weight._describe()}: use F.conv2d for "
                                f"a conv weight")
    return sparse_linear(input, weight, bias, weight._backend)


def _matmul(a, b):
    """a @ b with one sparse side: x @ W.T and W @ x run the kernels; x @ W and W.T @ x raise."""
    if isinstance(a, SparseWeight) == isinstance(b, SparseWeight):
        raise SparseWeightError("a product of two sparse weights needs a dense weight")
    w = b if isinstance(b, SparseWeight) else a
    if w.dim() != 2:
        raise SparseWeightError(f"matmul needs a 2-D weight, got {w._describe()}")
    if w is b:
        if not w._transposed:
            raise SparseWeightError(f"x @ W with {w._describe()} on the right is not a sparse kernel here: the "
                                    f"kernels compute x @ W.T (F.linear); use x @ layer.weight.T")
        return _linear(a, w.T)
    if w._transposed:
        raise SparseWeightError(f"W.T @ x with {w._describe()} is not a sparse kernel here; use W @ x or x @ W.T")
    return _linear(b, w) if b.dim() == 1 else _linear(b.mT, w).mT


def _rmatmul(self, other):          # other @ self
    return _matmul(other, self)


def _addmm(input, mat1, mat2, *, beta=1, alpha=1):
    out = _matmul(mat1, mat2)
    if alpha != 1:
        out = out * alpha
    if beta == 0:
        return out
    return out + (input if beta == 1 else beta * input)


def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    from sparsekern.ops.conv import conv_geometry, sparse_conv2d
    if not isinstance(weight, SparseWeight) or isinstance(input, SparseWeight) or weight.dim() != 4:
        raise SparseWeightError("F.conv2d with a sparse weight takes a conv layer's 4-D weight as `weight` only")
    geometry = conv_geometry(tuple(weight.shape[2:]), stride, padding, dilation, groups)
    return sparse_conv2d(input, weight, geometry, bias, weight._backend)


def _transpose(self, dim0=0, dim1=1):
    if self.dim() != 2 or {dim0 % 2, dim1 % 2} != {0, 1}:
        raise SparseWeightError(f"transpose({dim0}, {dim1}) of {self._describe()}: only a 2-D weight's "
                                f"two dimensions swap")
    return self._with(transposed=not self._transposed)


def _grad(self):
    g = self._values.grad
    return None if g is None else self._with(values=g)


def _requires_grad_(self, requires_grad=True):
    self._values.requires_grad_(requires_grad)
    return self._with()


def _set_requires_grad(self, requires_grad):
    self._values.requires_grad_(requires_grad)


def _to_dense(self, dtype=None, *, masked_grad=None):
    d = self._topology.to_dense(values=self._values)
    d = d.reshape(self._dense)
    d = d.t() if self._transposed else d
    return d if dtype is None else d.to(dtype)


def _to(self, *args, **kwargs):
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    if (device is None or torch.device(device) == self.device) and (dtype is None or dtype == self.dtype):
        return self
    raise SparseWeightError(f".to({device or dtype}) of {self._describe()} would copy the weight outside its layer: "
                            f"move or cast the module instead (layer.to(...))")


_T = torch.Tensor
_FUNCTIONS = {
    F.linear: _linear,
    torch.matmul: _matmul, _T.matmul: _matmul, _T.__matmul__: _matmul, _T.__rmatmul__: _rmatmul,
    torch.mm: _matmul, _T.mm: _matmul,
    torch.addmm: _addmm, _T.addmm: _addmm,
    F.conv2d: _conv2d,
    _T.t: _transpose, torch.t: _transpose, _T.transpose: _transpose, torch.transpose: _transpose,
    _T.T.__get__: _transpose, _T.mT.__get__: _transpose,
    _T.grad.__get__: _grad,
    _T.data.__get__: lambda self: self._with(values=self._values.data),
    _T.detach: lambda self: self._with(values=self._values.detach()),
    _T.requires_grad_: _requires_grad_, _T.requires_grad.__set__: _set_requires_grad,
    _T.to_dense: _to_dense,
    _T.to: _to,
    _T.__repr__: SparseWeight.__repr__,
}
