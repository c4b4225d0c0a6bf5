"""``SparseMultiheadAttention``: ``nn.MultiheadAttention``'s forward contract with sparse projections.

``nn.MultiheadAttention`` packs q, k and v into one ``in_proj_weight`` [3E, E] (or three
separate weights when kdim/vdim differ) and runs them through
``F.multi_head_attention_forward``, which cannot take a module. This module keeps
the four projections as modules, ``q_proj``, ``k_proj``, ``v_proj`` ([E, E], [E, kdim],
[E, vdim]) and ``out_proj`` ([E, E]), each a ``SparseLinear`` or a dense ``nn.Linear``,
and attends with ``F.scaled_dot_product_attention`` (or, when ``need_weights``, an explicit
softmax that also returns the weights), following torch's masking rules: bool masks are
True where attention is *not* allowed, float masks are added, ``bias_k``/``bias_v`` and
``add_zero_attn`` append a key, ``is_causal`` is a hint that needs ``attn_mask``.

torch's fused fast path (``nn.TransformerEncoderLayer`` in eval mode under ``no_grad``) is
bypassed cleanly: ``_qkv_same_embed_dim`` is False (there is no packed ``in_proj_weight``), the
reason torch's own layer gives for not taking it, and sparse weights have a
``__torch_function__``, which torch's check also refuses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")


def dense_projections(mha: nn.MultiheadAttention) -> dict[str, nn.Module]:
    """The four projections of ``mha`` as dense modules: ``nn.Linear`` copies of its q, k, v
    slices (of ``in_proj_weight``/``in_proj_bias``, or of the separate ``*_proj_weight``) and
    its own ``out_proj``."""
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
    E = mha.embed_dim
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.detach().chunk(3)
    else:
        weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
    biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.detach().chunk(3)
    parts = {}
    for name, w, b in zip(_PARTS, weights, biases):
        lin = nn.Linear(w.shape[1], E, bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        parts[name] = lin
    parts["out_proj"] = mha.out_proj
    return parts


def _additive(mask, name: str, dtype) -> torch.Tensor | None:
    """A bool (True = not allowed) or float (added) mask as a float mask, or None."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be bool or floating-point, got {mask.dtype}")
    return mask.to(dtype)


class SparseMultiheadAttention(nn.Module):
    """Multi-head attention with separate (sparse or dense) q/k/v/out projection modules.

    Build it with :meth:`from_dense` from an ``nn.MultiheadAttention`` (``sparsify`` does).
    ``forward`` has ``nn.MultiheadAttention.forward``'s signature and results:

    Args (forward):
        query: float [L, N, E] ([N, L, E] if ``batch_first``) or unbatched [L, E].
        key: float [S, N, kdim] (or [N, S, kdim], or [S, kdim]).
        value: float [S, N, vdim] (likewise).
        key_padding_mask: bool or float [N, S] (or [S] unbatched); True/-inf ignores a key.
        need_weights: also return the attention weights (explicit softmax path).
        attn_mask: bool or float [L, S] or [N * num_heads, L, S].
        average_attn_weights: average the returned weights over heads.
        is_causal: hint that ``attn_mask`` is the causal mask (``attn_mask`` is required).

    Returns:
        (output float like query with E features, weights float [N, L, S] or [N, H, L, S]
        when ``need_weights``, else None).
    """

    def __init__(self, embed_dim: int, num_heads: int, q_proj: nn.Module, k_proj: nn.Module,
                 v_proj: nn.Module, out_proj: nn.Module, dropout: float = 0.0, batch_first: bool = False,
                 bias_k: torch.Tensor | None = None, bias_v: torch.Tensor | None = None,
                 add_zero_attn: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if (bias_k is None) != (bias_v is None):
            raise ValueError("give both bias_k and bias_v, or neither")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.kdim, self.vdim = k_proj.in_features, v_proj.in_features
        for name in _PARTS:
            m = getattr(self, name)
            want_in = {"k_proj": self.kdim, "v_proj": self.vdim}.get(name, embed_dim)
            if (m.out_features, m.in_features) != (embed_dim, want_in):
                raise ValueError(f"{name} maps {m.in_features} -> {m.out_features} features, expected "
                                 f"{want_in} -> {embed_dim}")
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), bool(batch_first), bool(add_zero_attn)
        self.bias_k = None if bias_k is None else nn.Parameter(bias_k.detach().clone())
        self.bias_v = None if bias_v is None else nn.Parameter(bias_v.detach().clone())
        # nn.MultiheadAttention's attributes that torch's transformer layers read: no packed
        # projection, so their fused fast path is skipped (see the module doc)
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.in_proj_bias = None

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, parts: dict[str, nn.Module] | None = None):
        """The attention of ``mha`` (heads, dropout, batch_first, bias_k/v, add_zero_attn) with the
        projections in ``parts`` (name in q_proj/k_proj/v_proj/out_proj -> module); the others are
        ``mha``'s own, as dense modules (:func:`dense_projections`)."""
        parts = dict(parts or {})
        unknown = sorted(set(parts) - set(_PARTS))
        if unknown:
            raise ValueError(f"parts names {unknown}; the projections are {list(_PARTS)}")
        dense = dense_projections(mha)
        dense.update(parts)
        return cls(mha.embed_dim, mha.num_heads, *(dense[n] for n in _PARTS), dropout=mha.dropout,
                   batch_first=mha.batch_first, bias_k=mha.bias_k, bias_v=mha.bias_v,
                   add_zero_attn=mha.add_zero_attn)

    @property
    def q_proj_weight(self):
        return self.q_proj.weight

    @property
    def k_proj_weight(self):
        return self.k_proj.weight

    @property
    def v_proj_weight(self):
        return self.v_proj.weight

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("SparseMultiheadAttention takes padded tensors and key_padding_mask, not nested "
                             "tensors")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must all be 3-D (batched) or 2-D (unbatched), got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if batched and not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        elif not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        N, L, E, S = query.shape[0], query.shape[1], self.embed_dim, key.shape[1]
        if query.shape[-1] != E:
            raise ValueError(f"query has {query.shape[-1]} features, expected embed_dim={E}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in batch/length")
        kpm = _additive(key_padding_mask, "key_padding_mask", query.dtype)
        mask = _additive(attn_mask, "attn_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        causal = is_causal and kpm is None and not need_weights         # torch's rule: then SDPA's own mask
        if causal:
            mask = None
        if kpm is not None and tuple(kpm.shape) != (N, S):
            raise ValueError(f"key_padding_mask has shape {tuple(kpm.shape)}, expected {(N, S)}")
        if mask is not None and mask.dim() == 2:
            if tuple(mask.shape) != (L, S):
                raise ValueError(f"the 2-D attn_mask has shape {tuple(mask.shape)}, expected {(L, S)}")
            mask = mask[None, None]
        elif mask is not None:
            if tuple(mask.shape) != (N * self.num_heads, L, S):
                raise ValueError(f"the 3-D attn_mask has shape {tuple(mask.shape)}, expected "
                                 f"{(N * self.num_heads, L, S)}")
            mask = mask.view(N, self.num_heads, L, S)

        H, D = self.num_heads, self.head_dim
        q = self.q_proj(query).view(N, L, H, D).transpose(1, 2)
        k, v = self.k_proj(key), self.v_proj(value)                     # [N, S, E]
        extra = []
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, E).expand(N, 1, E)], 1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, E).expand(N, 1, E)], 1)
            extra.append(1)
        k = k.view(N, -1, H, D).transpose(1, 2)
        v = v.view(N, -1, H, D).transpose(1, 2)
        if self.add_zero_attn:
            zeros = torch.zeros(N, H, 1, D, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], 2), torch.cat([v, zeros], 2)
            extra.append(1)
        if extra:                                    # the appended keys are never masked
            pad = (0, len(extra))
            mask = None if mask is None else F.pad(mask, pad)
            kpm = None if kpm is None else F.pad(kpm, pad)
        if kpm is not None:
            kpm = kpm.view(N, 1, 1, -1)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0

        if need_weights:
            scores = (q * D ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            if p > 0:
                weights = F.dropout(weights, p)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")
