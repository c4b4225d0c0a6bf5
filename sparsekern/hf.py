"""Load a sparsified Hugging Face model back: ``sparsekern.from_pretrained``.

``model.save_pretrained(d)`` on a sparsified model writes every sparse layer's topology
(``<layer>.topology.values``, ``.row_offsets``, ``.col_indices``, the transpose metadata and
``.meta`` = (out, in, block size)) beside the dense tensors. Plain
``ModelClass.from_pretrained(d)`` cannot use them: it builds dense layers, reports those keys
as unexpected and initialises the sparse layers at random. :func:`from_pretrained` instead
builds the model from ``config.json``, turns every layer the checkpoint stores sparse into
its sparse twin with exactly the stored topology (``nn.Linear`` -> ``SparseLinear``,
``nn.Conv2d`` -> ``SparseConv2d``, HF ``Conv1D`` -> ``SparseConv1D``, an
``nn.MultiheadAttention`` with ``q_proj``/``k_proj``/``v_proj``/``out_proj`` entries ->
``SparseMultiheadAttention``), then loads every tensor; the result computes bitwise what
the saved model computed. Weights are read from ``model.safetensors`` (or its sharded
index), ``pytorch_model.bin`` (``weights_only``; or its index), or a directory's only
``*.safetensors`` file. Checkpoints of the last version (``<layer>.weight.values`` ...) load too.

Anything that does not fit raises ``ValueError`` naming the file and the layer: an
unreadable file, a sparse layer the model built from the config does not have or has with
another shape, a malformed topology, a missing or unexpected tensor. transformers is an
optional dependency (``pip install 'sparsekern[hf]'``), imported only here.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from sparsekern._optional import require
from sparsekern.formats import _STATE_FIELDS, BSRTopology, CSRTopology
from sparsekern.nn import SparseConv1D, SparseConv2d, SparseLinear, SparseMultiheadAttention
from sparsekern.nn._common import rename_legacy_keys
from sparsekern.nn.conv1d import is_hf_conv1d

_SINGLE = ("model.safetensors", "pytorch_model.bin")
_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")


def from_pretrained(model_class, path, *, config=None, backend: str = "auto", **config_kwargs) -> nn.Module:
    """Rebuild a sparsified model saved with ``save_pretrained`` (see the module doc).

    Args:
        model_class: the ``transformers`` model class that was saved, e.g.
            ``BertForSequenceClassification`` (or any class with ``config_class`` and
            ``__init__(config)``).
        path: the directory ``save_pretrained`` wrote (``config.json`` and the weights).
        config: a config to use instead of ``path/config.json``.
        backend: the sparse layers' kernel backend ("auto", "cpu", "cuda", "reference").
        **config_kwargs: passed to ``model_class.config_class.from_pretrained`` (config overrides).

    Returns:
        The model in eval mode, on the CPU, in the checkpoint's dtype when all its floating
        tensors share one (else the dtype the config builds); every tensor is copied from
        the checkpoint, bit for bit.
    """
    require("transformers", "sparsekern.from_pretrained", "hf")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory; give the directory that save_pretrained wrote")
    if config is None:
        if not (path / "config.json").is_file():
            raise ValueError(f"{path / 'config.json'}: missing; from_pretrained builds the model from its config")
        try:
            config = model_class.config_class.from_pretrained(path, **config_kwargs)
        except Exception as exc:           # a malformed config.json: name the file
            raise ValueError(f"{path / 'config.json'}: not a readable config: {exc}") from None
    state, origin = read_state_dict(path)
    model = model_class(config)
    state, origin = _to_model_keys(model, state, origin)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:                   # build in the saved dtype, so sparse and dense parts agree
        model.to(dtypes.pop())
    restore_topologies(model, state, origin, backend)
    _load(model, state, origin)
    return model.eval()


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by key, file name by key) of the checkpoint in directory ``path``."""
    files = _weight_files(path)
    state, origin = {}, {}
    for f in files:
        for k, v in _read_file(f).items():
            if k in state:
                raise ValueError(f"{f}: tensor {k!r} is also in {origin[k]}")
            state[k], origin[k] = v, str(f)
    return state, origin


def _to_model_keys(model: nn.Module, state: dict, origin: dict) -> tuple[dict, dict]:
    """``state`` under the model's own names: transformers 5 saves some models under their older
    checkpoint names (``save_pretrained(save_original_format=True)``, e.g. ViT's
    ``encoder.layer.0.attention.attention.key`` for ``layers.0.attention.k_proj``) and renames on
    load; the same renamings apply here, to the sparse keys too. A key that needs one of
    transformers' tensor conversions (a merge or split, not a renaming) is refused. Then
    the last version's keys are renamed (:func:`rename_legacy`)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        transforms = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):      # transformers without key conversions
        transforms = []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out, where = {}, {}
    for k, v in state.items():
        new = k
        if renamings or converters:
            new, converted = rename_source_key(k, renamings, converters)
            if converted is not None:
                raise ValueError(f"{origin[k]}: tensor {k!r} (layer {k.rsplit('.', 1)[0]!r}) needs transformers' "
                                 f"weight conversion {converted!r}, which sparsekern.from_pretrained does not run")
        if new in out:
            raise ValueError(f"{origin[k]}: tensors {k!r} and another key both load as {new!r}")
        out[new], where[new] = v, origin[k]
    rename_legacy(out, where)
    return out, where


def _weight_files(path: Path) -> list[Path]:
    for name in _INDEX:
        index = path / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{index}: not a valid index of shards ({exc})") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ValueError(f"{index}: lists shards that do not exist: {missing}")
            return [path / s for s in shards]
    for name in _SINGLE:
        if (path / name).is_file():
            return [path / name]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise ValueError(f"{path}: no weights found (expected one of {list(_SINGLE + _INDEX)}"
                     f"{'; several *.safetensors files and no index' if found else ''})")


def _read_file(f: Path) -> dict[str, torch.Tensor]:
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(f))
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:               # safetensors and torch.load raise many types
        text = str(exc).strip().splitlines()
        raise ValueError(f"{f}: not a readable checkpoint ({text[0] if text else type(exc).__name__})") from None


def rename_legacy(state: dict, origin: dict) -> None:
    """Rename the last version's keys (``<layer>.weight.row_offsets`` ...) to ``<layer>.topology.*``."""
    prefixes = {k[:-len("weight.row_offsets")] for k in state if k.endswith("weight.row_offsets")}
    for p in prefixes:
        before = set(state)
        rename_legacy_keys(state, p)
        for k in set(state) - before:
            origin[k] = origin.pop(p + "weight." + k[len(p + "topology."):])


def sparse_layers(state: dict) -> list[str]:
    """Names of the layers ``state`` stores sparse (with a ``.topology.meta`` entry), in key order."""
    return [k[:-len(".topology.meta")] for k in state if k.endswith(".topology.meta")]


def restore_topologies(model: nn.Module, state: dict, origin: dict, backend: str = "auto") -> None:
    """Replace, in place, every layer of ``model`` that ``state`` stores sparse by its sparse twin
    holding the stored topology (values are loaded afterwards)."""
    new: dict[str, nn.Module] = {}
    attention: dict[str, dict[str, nn.Module]] = {}
    for name in sparse_layers(state):
        where = origin[f"{name}.topology.meta"]
        parent_name, _, leaf = name.rpartition(".")
        parent = _find(model, parent_name)
        if isinstance(parent, nn.MultiheadAttention) and leaf in _PARTS:
            attention.setdefault(parent_name, {})[leaf] = SparseLinear.from_topology(
                _topology(state, name, where), _bias(state, name), backend)
            continue
        dense = _find(model, name)
        if dense is None:
            raise ValueError(f"{where}: layer {name!r} is stored sparse, but the model built from the config "
                             f"has no module {name!r}")
        topo = _topology(state, name, where)
        try:
            new[name] = _twin(dense, topo, backend)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: layer {name!r}: {exc}") from None
    for mha_name, parts in attention.items():
        where = origin[f"{mha_name}.{next(iter(parts))}.topology.meta"]
        try:
            new[mha_name] = SparseMultiheadAttention.from_dense(_find(model, mha_name), parts)
        except ValueError as exc:
            raise ValueError(f"{where}: attention {mha_name!r}: {exc}") from None
    for name, module in new.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(_find(model, parent_name), leaf, module)


def _find(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _twin(dense: nn.Module, topo, backend: str) -> nn.Module:
    """The sparse twin of ``dense`` (built from the config) holding ``topo``; its bias is loaded later."""
    if is_hf_conv1d(dense):
        shape = (dense.nf, dense.nx)
    elif isinstance(dense, nn.Conv2d):
        return SparseConv2d.from_topology(dense, topo, backend)
    elif isinstance(dense, nn.Linear):
        shape = (dense.out_features, dense.in_features)
    else:
        raise TypeError(f"the model built from the config has a {type(dense).__name__} here; sparsekern "
                        f"stores Linear, Conv2d and Conv1D layers sparse")
    if tuple(topo.shape) != shape:
        raise ValueError(f"the checkpoint's topology is {tuple(topo.shape)} (out, in) but the model built from "
                         f"the config has {shape}: is it the same config?")
    bias = getattr(dense, "bias", None)
    if is_hf_conv1d(dense):
        layer = SparseConv1D.from_topology(topo, bias, backend)
        layer._dense_cls = type(dense)
        return layer
    return SparseLinear.from_topology(topo, bias, backend)


def _bias(state: dict, name: str):
    b = state.get(f"{name}.bias")
    return torch.zeros_like(b) if isinstance(b, torch.Tensor) else None


def _topology(state: dict, name: str, where: str):
    """The topology stored under ``name.topology.*``, validated (ValueError naming file and layer)."""
    prefix = f"{name}.topology."
    missing = [prefix + f for f in _STATE_FIELDS if prefix + f not in state]
    if missing:
        raise ValueError(f"{where}: layer {name!r} is stored sparse but lacks {missing}")
    t = {f: state[prefix + f] for f in _STATE_FIELDS}
    meta = t["meta"]
    if meta.dtype != torch.int64 or meta.numel() != 3:
        raise ValueError(f"{where}: layer {name!r}: {prefix}meta must be 3 int64 (out_features, in_features, "
                         f"block_size), got {meta.dtype} {tuple(meta.shape)}")
    out_f, in_f, b = (int(v) for v in meta.tolist())
    try:
        if b == 1:
            return CSRTopology((out_f, in_f), t["row_offsets"], t["col_indices"], t["values"])
        return BSRTopology((out_f, in_f), t["row_offsets"], t["col_indices"], t["values"], b)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{where}: layer {name!r} has a malformed topology: {exc}") from None


def _load(model: nn.Module, state: dict, origin: dict) -> None:
    """Load every tensor; a missing one is allowed only if it is tied to one that was loaded."""
    try:
        result = model.load_state_dict(OrderedDict(state), strict=False)
    except (ValueError, RuntimeError) as exc:            # a sparse layer's check, or torch's size mismatch
        raise ValueError(f"{_where(str(exc), origin)}: {exc}") from None
    if result.unexpected_keys:
        k = result.unexpected_keys[0]
        raise ValueError(f"{origin[k]}: tensor {k!r} (layer {k.rsplit('.', 1)[0]!r}) is not in the model built "
                         f"from the config ({len(result.unexpected_keys)} unexpected in all)")
    aliases: dict[int, list[str]] = {}
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(t), []).append(n)
    names = {n: id(t) for n, t in [*model.named_parameters(remove_duplicate=False),
                                    *model.named_buffers(remove_duplicate=False)]}
    untied = [k for k in result.missing_keys if not any(a in state for a in aliases.get(names.get(k), []))]
    if untied:
        files = sorted(set(origin.values()))
        raise ValueError(f"{', '.join(files)}: no tensor {untied[0]!r} for layer {untied[0].rsplit('.', 1)[0]!r} "
                         f"({len(untied)} missing in all)")


def _where(message: str, origin: dict) -> str:
    """The file of the first checkpoint key whose layer ``message`` names (else every file)."""
    for key, f in origin.items():
        if key.rsplit(".", 1)[0] in message:
            return f
    return ", ".join(sorted(set(origin.values())))
