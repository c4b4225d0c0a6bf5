"""Datasets for the training jobs: all local, no network.

* ``digits``: scikit-learn's 1,797 scanned 8x8 handwritten digits, shipped inside the
  scikit-learn package.
* ``cifar10`` / ``cifar100``: the standard python-pickle archives, unpacked in a local
  directory (``data_batch_1..5`` + ``test_batch``, or ``train`` + ``test``). They are
  unpickled by :class:`CifarUnpickler`, which builds only what that format holds (dicts,
  lists, strings, numbers, numpy arrays) and refuses any other pickled global, so a file
  put in the data directory cannot run code.
* ``synthetic``: a wide random classification task (a random teacher network labels
  Gaussian inputs), where layer widths are large enough for sparsity to pay.
* ``text``: byte-level language modelling on the Python standard library's own source
  (:data:`TEXT_FILES`, present on every machine that runs Python; see :func:`load_text`).

Every classification loader returns a :class:`Split` of float32 inputs and int64 labels,
standardised with the training statistics; ``text`` returns int64 byte sequences and
their next bytes. Every loader raises :class:`DatasetError` (a ``ValueError``) naming
what is missing or wrong.
"""
from __future__ import annotations

import codecs
import hashlib
import pickle
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "cifar100", "synthetic", "text")


class DatasetError(ValueError):
    """A dataset is missing, incomplete or corrupt (the message says which file and why)."""


@dataclass
class Split:
    """x_train float32 [N, ...], y_train int64 [N], x_test, y_test, and the class count.

    For ``task == "language-model"``: x_train int64 [N, T] token sequences, y_train int64
    [N, T] the next token of each position, ``num_classes`` the vocabulary size. ``info``:
    where the data came from (plain values, written into the results).
    """
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    task: str = "classification"
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _standardise(x_train: np.ndarray, x_test: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True) + 1e-6
    return (x_train - mean) / std, (x_test - mean) / std


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    return x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]]


def _to_split(xtr, ytr, xte, yte, classes) -> Split:
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)  # noqa: E731
    return Split(t(xtr, torch.float32), t(ytr, torch.int64), t(xte, torch.float32), t(yte, torch.int64), classes)


def load_digits(image: bool = False, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's digits: [N, 64] (or [N, 1, 8, 8] with ``image``), 10 classes."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:  # pragma: no cover - environment message
        raise DatasetError("the 'digits' dataset needs scikit-learn: pip install 'sparsekern[train]' "
                           "(or pick another --dataset)") from exc
    d = sk_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    xtr, xte = _standardise(xtr, xte, axes=None)
    if image:
        xtr, xte = xtr.reshape(-1, 1, 8, 8), xte.reshape(-1, 1, 8, 8)
    return _to_split(xtr, ytr, xte, yte, 10)


def _numpy_core(module: str, name: str):
    """``numpy._core.<module>.<name>`` (numpy 2), or ``numpy.core...`` (numpy 1)."""
    import importlib
    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except ImportError:                                          # pragma: no cover - numpy 1.x
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


class CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR python batch, refusing (:class:`DatasetError`) every global but those of
    its format: numpy arrays and dtypes (as the Python 2 originals or numpy 1.x/2.x pickle them,
    ``_frombuffer`` for protocol 5) and builtin containers, strings and bytes. Pickle opcodes
    alone build only plain values, so no code in the file can run."""

    ALLOWED = {
        **{(f"numpy.{core}.{module}", name): _numpy_core(module, name) for core in ("core", "_core")
           for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))},
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,      # bytes, as Python 3 pickles them in protocols 0-2
        **{(module, t.__name__): t for module in ("builtins", "__builtin__")
           for t in (dict, list, tuple, set, frozenset, bytes, bytearray, str)},
    }

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        """The allowed global ``module.name``; any other is a :class:`DatasetError` naming the file."""
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(f"{self.path} refers to {module}.{name}, which a CIFAR python batch never "
                               f"holds; refused without running it (allowed: numpy arrays, builtin "
                               f"containers, strings)") from None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, path).load()
    except DatasetError:
        raise
    except Exception as exc:      # a corrupt pickle raises many types (UnpicklingError, EOFError, ...)
        raise DatasetError(f"{path} is not a readable CIFAR python-pickle batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} holds a {type(batch).__name__}, not the table of a CIFAR python batch")
    return batch


def _cifar_arrays(batch: dict, path: Path, label_key: str):
    if "data" not in batch or label_key not in batch:
        raise DatasetError(f"{path} has no 'data'/'{label_key}' entries; is it a CIFAR python batch?")
    x = np.asarray(batch["data"], dtype=np.float32)
    y = np.asarray(batch[label_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise DatasetError(f"{path}: data has shape {x.shape} with {len(y)} labels; expected [N, 3072] and N labels")
    return x.reshape(-1, 3, 32, 32) / 255.0, y


def load_cifar(root, num_classes: int = 10) -> Split:
    """CIFAR-10/100 from a local directory in the python-pickle format: [N, 3, 32, 32]."""
    if num_classes not in (10, 100):
        raise DatasetError(f"num_classes must be 10 or 100, got {num_classes}")
    root = Path(root)
    if num_classes == 10:
        train_files, test_files, label_key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"
    else:
        train_files, test_files, label_key = ["train"], ["test"], "fine_labels"
    archive = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if not root.is_dir():
        raise DatasetError(f"CIFAR-{num_classes} directory {root} does not exist; unpack the python version "
                           f"of the dataset ({archive}) there. There is no download: the machine is offline.")
    if not (root / train_files[0]).exists() and (root / archive).is_dir():
        root = root / archive
    missing = [f for f in train_files + test_files if not (root / f).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-{num_classes} directory {root} lacks {missing}; expected "
                           f"{train_files + test_files} (the python-pickle archive {archive})")
    parts = [_cifar_arrays(_unpickle(root / f), root / f, label_key) for f in train_files]
    test = [_cifar_arrays(_unpickle(root / f), root / f, label_key) for f in test_files]
    xtr, ytr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    xte, yte = np.concatenate([p[0] for p in test]), np.concatenate([p[1] for p in test])
    if ytr.min() < 0 or ytr.max() >= num_classes:
        raise DatasetError(f"{root}: labels span [{ytr.min()}, {ytr.max()}], expected [0, {num_classes})")
    xtr, xte = _standardise(xtr, xte, axes=(0, 2, 3))
    return _to_split(xtr, ytr, xte, yte, num_classes)


def make_synthetic(n_train: int = 8192, n_test: int = 2048, dim: int = 1024, num_classes: int = 10,
                   seed: int = 0) -> Split:
    """Gaussian inputs [N, dim] labelled by a random two-layer teacher (learnable, not separable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, dim, generator=g)
    w1 = torch.randn(dim, 256, generator=g) / dim ** 0.5
    w2 = torch.randn(256, num_classes, generator=g) / 16.0
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return Split(x[:n_train].contiguous(), y[:n_train].contiguous(), x[n_train:].contiguous(),
                 y[n_train:].contiguous(), num_classes)


# The text corpus: these long-standing standard-library modules (paths under sysconfig's
# "stdlib"), in this sorted order, concatenated and cut at TEXT_BYTES (the default cap reaches
# into difflib.py). A file missing from some Python version is skipped, and the results say
# so (load_text's info); the files' contents differ a little between versions (its sha256).
TEXT_FILES = (
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "cmd.py", "codecs.py", "collections/__init__.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "dis.py",
    "enum.py", "fractions.py", "functools.py", "getopt.py", "gettext.py", "glob.py", "heapq.py",
    "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py", "os.py",
    "pprint.py", "queue.py", "random.py", "sched.py", "selectors.py", "shlex.py", "shutil.py",
    "statistics.py", "string.py", "subprocess.py", "tarfile.py", "textwrap.py", "threading.py",
    "tokenize.py", "traceback.py", "typing.py", "uuid.py")
TEXT_BYTES = 512 * 1024
TEXT_VALID_FRACTION = 0.1


def _windows(stream: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping sequences [N, context] of ``stream`` and their next bytes."""
    n = (len(stream) - 1) // context
    x = stream[:n * context].reshape(n, context)
    y = stream[1:n * context + 1].reshape(n, context)
    return x.contiguous(), y.contiguous()


def load_text(context: int = 64, root=None, files=TEXT_FILES, max_bytes: int = TEXT_BYTES,
              valid_fraction: float = TEXT_VALID_FRACTION) -> Split:
    """Byte-level language modelling on Python's own standard library source.

    The ``files`` (paths under ``root``, default ``sysconfig.get_paths()["stdlib"]``) are read
    in order and concatenated until ``max_bytes``; the first ``1 - valid_fraction`` of the
    bytes train, the rest (the end of the last files read) is the validation text. Both are
    cut into non-overlapping sequences of ``context`` bytes, each predicting its next bytes:
    x int64 [N, context], y int64 [N, context], vocabulary 256.

    ``info`` records what was used (the standard library differs a little between Python
    versions): the Python version, the root, each file with the bytes taken from it, the
    files missing, the byte counts and the corpus's SHA-256.
    """
    if context < 1:
        raise DatasetError(f"context must be >= 1, got {context}")
    if not 0.0 < valid_fraction < 1.0:
        raise DatasetError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    parts, used, missing, total = [], [], [], 0
    for name in files:
        if total >= max_bytes:
            break
        path = root / name
        if not path.is_file():
            missing.append(name)
            continue
        chunk = path.read_bytes()[:max_bytes - total]
        parts.append(chunk)
        used.append([name, len(chunk)])
        total += len(chunk)
    corpus = b"".join(parts)
    n_valid = int(round(len(corpus) * valid_fraction))
    if min(n_valid, len(corpus) - n_valid) < context + 1:
        raise DatasetError(f"the text corpus under {root} has {len(corpus):,} bytes ({len(used)} of the "
                           f"{len(files)} files found); too little for sequences of {context} bytes")
    stream = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    x_train, y_train = _windows(stream[:len(corpus) - n_valid], context)
    x_test, y_test = _windows(stream[len(corpus) - n_valid:], context)
    info = {"name": "text", "python": platform.python_version(), "root": str(root), "files": used,
            "missing": missing, "bytes": len(corpus), "train_bytes": len(corpus) - n_valid,
            "valid_bytes": n_valid, "context": context, "sha256": hashlib.sha256(corpus).hexdigest()}
    return Split(x_train, y_train, x_test, y_test, 256, task="language-model", info=info)


def load(name: str, root=None, **kwargs) -> Split:
    """By name: "digits" (kwargs: image, test_fraction, seed), "cifar10"/"cifar100" (root),
    "synthetic" (kwargs: n_train, n_test, dim, num_classes, seed), "text" (kwargs: context,
    files, max_bytes, valid_fraction; root: the directory the files are under)."""
    if name == "digits":
        return load_digits(**kwargs)
    if name in ("cifar10", "cifar100"):
        if root is None:
            raise DatasetError(f"{name} needs a data directory (root=...)")
        return load_cifar(root, 10 if name == "cifar10" else 100)
    if name == "synthetic":
        return make_synthetic(**kwargs)
    if name == "text":
        return load_text(root=root, **kwargs)
    raise DatasetError(f"unknown dataset {name!r}; choose one of {DATASETS}")
