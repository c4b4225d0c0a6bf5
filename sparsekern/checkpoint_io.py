"""Checkpoint files of the training command: written atomically, read without running code.

* :func:`save` writes with ``torch.save`` to a temporary file beside the target, flushes
  and fsyncs it, renames it over the target (``os.replace``) and fsyncs the directory. A
  crash, kill or power cut at any point leaves the previous checkpoint or the new one,
  never a torn file; a failed write removes its temporary file.
* :func:`load` reads with ``torch.load(weights_only=True)``, which unpickles only tensors
  and plain containers and scalars, so a crafted file cannot run code. Given ``fields``
  (a table of :class:`Field`, such as the training command's one list of checkpoint keys,
  ``sparsekern.train.checkpoint.KEYS``) it then checks the file's structure
  (:func:`check`) and raises :class:`CheckpointError`, a ``ValueError``, naming the field
  that is missing, unexpected or of the wrong type.

A checkpoint therefore holds only tensors, ``None``, bools, numbers, strings and
lists/tuples/dicts of them: the training command stores its options with paths as strings.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not shaped like a training checkpoint."""


def save(state: dict, path) -> None:
    """Write ``state`` to ``path`` atomically: the file at ``path`` is always complete (old or new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never follow or reuse a file someone else put there; 0o666 & ~umask, as open() would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    _remove_stale_temporaries(path)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); platforms that cannot open a directory skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of ``path`` left by writers that were killed (their process is gone).
    POSIX only: elsewhere ``os.kill(pid, 0)`` would not just probe the process."""
    if os.name != "posix":
        return
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) == os.getpid():
            continue
        try:
            os.kill(int(parts[0]), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except (OSError, OverflowError):      # alive but not ours, or not checkable: leave it
            pass


# --- reading --------------------------------------------------------------------------------

def is_int(v) -> bool:
    """True for an int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """True for an int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_plain(v) -> bool:
    """True for None, bools, numbers, strings and lists/tuples/str-keyed dicts of them."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and is_plain(x) for k, x in v.items())
    return False


def tensor_of(dtype: torch.dtype) -> Callable[[Any], bool]:
    """A check: a 1-D tensor of ``dtype``."""
    return lambda v: isinstance(v, torch.Tensor) and v.dtype == dtype and v.dim() == 1


def table_of(value_ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A check: a dict with str keys whose values pass ``value_ok``."""
    return lambda v: isinstance(v, dict) and all(isinstance(k, str) and value_ok(x) for k, x in v.items())


def list_of(item_ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A check: a list or tuple whose items pass ``item_ok``."""
    return lambda v: isinstance(v, (list, tuple)) and all(item_ok(x) for x in v)


def optional(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A check: None, or a value passing ``ok``."""
    return lambda v: v is None or ok(v)


@dataclass(frozen=True)
class Field:
    """One entry of a checkpoint: a check of its value, the check in words, and whether it may be absent."""
    ok: Callable[[Any], bool]
    expected: str
    required: bool = True
    default: Any = None


def check(ck, path, fields: Mapping[str, Field]) -> dict:
    """``ck`` if it has every required entry of ``fields`` with the right type and nothing else,
    with absent optional entries set to their defaults; else :class:`CheckpointError` naming the field."""
    if not isinstance(ck, dict):
        raise CheckpointError(f"checkpoint {path} is not a sparsekern-train checkpoint (it holds a "
                              f"{type(ck).__name__}, not a table)")
    missing = sorted(k for k, f in fields.items() if f.required and k not in ck)
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a sparsekern-train checkpoint (missing {missing})")
    unknown = sorted(str(k) for k in ck if k not in fields)
    if unknown:
        raise CheckpointError(f"checkpoint {path} has unknown fields {unknown}")
    for key, field in fields.items():
        if key in ck and not field.ok(ck[key]):
            raise CheckpointError(f"checkpoint {path}: field {key!r} should be {field.expected}, got "
                                  f"{_describe(ck[key])}")
    return {**{k: f.default for k, f in fields.items() if not f.required}, **ck}


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    text = repr(v)
    return f"{type(v).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def load(path, fields: Mapping[str, Field] | None = None) -> dict:
    """Read the checkpoint at ``path`` without running any code stored in it, and :func:`check`
    it against ``fields`` when given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # PosixPath: options of checkpoints written before they were stored as strings (it only builds a path)
        with torch.serialization.safe_globals([pathlib.PosixPath]):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:      # torch.load raises many types on a corrupt or foreign file
        raise CheckpointError(f"checkpoint {path} is not readable: {_one_line(exc)}") from None
    return ck if fields is None else check(ck, path, fields)


def _one_line(exc: Exception) -> str:
    """torch's weights-only refusal is many lines of advice; keep the reason (the refused global)."""
    text = str(exc)
    refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text)
    if refused:
        return (f"{refused.group(1).strip()} A checkpoint holds only tensors and plain values; "
                f"this file was refused without running it")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
