"""The training command's files and signals: crafted checkpoints and CIFAR batches run
nothing, checkpoints survive kills, SIGTERM and a second Ctrl-C stop cleanly, malformed
checkpoints and changed options on --resume are named."""
import contextlib
import io
import os
import pickle
import random
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsekern import checkpoint_io, data as datasets, train
from test_train import TINY, final_run, interrupt_then_resume

ROOT = Path(__file__).resolve().parents[1]


def run_command(*args, timeout=120):
    """``python -m sparsekern.train ARGS`` in a fresh interpreter: (returncode, stdout, stderr)."""
    out = subprocess.run([sys.executable, "-m", "sparsekern.train", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout, out.stderr


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def read(path) -> dict:
    """A checkpoint these tests wrote themselves (trusted), to edit it."""
    return torch.load(path, weights_only=False)


def opened(f):
    """What torch.save writes to: ``f`` opened if it is a path, else ``f`` (a file) itself."""
    return open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f)


def ctrl_c_twice():
    """Send SIGINT to this process twice, the second once the command has seen the first (two
    signals sent back to back can merge into one), then wait: the second must stop the command."""
    os.kill(os.getpid(), signal.SIGINT)
    stop = getattr(signal.getsignal(signal.SIGINT), "__self__", None)     # the command's StopRequest
    deadline = time.monotonic() + 5
    while stop is not None and not stop.requested and time.monotonic() < deadline:
        time.sleep(0.001)
    ctrl_c_again()


def ctrl_c_again():
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:         # the command's handler raises in here (short sleeps:
        time.sleep(0.001)                      # a signal caught by another thread does not end a sleep)


@pytest.fixture(scope="module")
def first_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck")
    assert train.main(TINY + ["--method", "rigl", "--stop-after", "5", "--out", str(out)]) == 130
    return out / "checkpoint_rigl.pt"


@pytest.fixture
def checkpoint(first_checkpoint, tmp_path):
    """A real checkpoint of a TINY rigl run (cosine LR) stopped after 5 steps, this test's own copy
    (its --out is the copy's directory)."""
    state = read(first_checkpoint)
    ck = tmp_path / "given" / first_checkpoint.name
    state["args"]["out"] = type(state["args"]["out"])(ck.parent)
    ck.parent.mkdir()
    torch.save(state, ck)
    return ck


class MakesMarker:
    """Unpickling it (by plain pickle or torch.load(weights_only=False)) creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- 1. no code from files ------------------------------------------------------------------

def test_crafted_checkpoint_runs_nothing(tmp_path, checkpoint):
    marker = tmp_path / "pwned"
    state = read(checkpoint)
    state["history"] = [MakesMarker(marker)]
    torch.save(state, tmp_path / "evil.pt")
    rc, _, err = run_command("--resume", tmp_path / "evil.pt", "--quiet", "--out", tmp_path / "o")
    assert not marker.exists()
    assert rc == 2 and "Traceback" not in err
    assert len(error_lines(err)) == 1 and "is not readable" in err and "was refused without running it" in err


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2 wrote the official CIFAR batches: ``bytes`` as py2 ``str`` (BINSTRING),
    numpy through ``numpy.core.multiarray._reconstruct``."""
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)
    dispatch[bytes] = _save_py2_str


def cifar_bytes(batch: dict, style: str) -> bytes:
    if style == "python2":
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump({k.encode(): v.encode() if isinstance(v, str) else v
                                          for k, v in batch.items()})
        return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return pickle.dumps(batch, protocol=int(style.removeprefix("protocol")))


def fake_cifar(root: Path, classes: int, style: str, n: int = 4, seed: int = 0) -> dict:
    """A CIFAR-``classes`` directory in the official python format with ``n`` images per file;
    returns the arrays written, by file name."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    label_key = "labels" if classes == 10 else "fine_labels"
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, classes, n)]
        batch = {"batch_label": f"{name} of fake", label_key: y, "data": x,
                 "filenames": [f"img_{i}.png" for i in range(n)]}
        if classes == 100:
            batch["coarse_labels"] = [v // 5 for v in y]
        (root / name).write_bytes(cifar_bytes(batch, style))
        written[name] = (x, y)
    return written


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("style", ["python2", "protocol2", "protocol5"])
def test_genuine_cifar_pickles_still_load(tmp_path, classes, style):
    written = fake_cifar(tmp_path, classes, style)
    split = datasets.load(f"cifar{classes}", root=tmp_path)
    train_names = [k for k in written if "test" not in k]
    assert split.x_train.shape == (4 * len(train_names), 3, 32, 32) and split.x_test.shape == (4, 3, 32, 32)
    assert split.y_train.tolist() == [v for k in train_names for v in written[k][1]]
    test_name = "test_batch" if classes == 10 else "test"
    raw = datasets._unpickle(tmp_path / test_name)
    assert np.array_equal(raw["data"], written[test_name][0])


def test_crafted_cifar_batch_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "cifar"
    fake_cifar(root, 10, "python2")
    (root / "data_batch_3").write_bytes(pickle.dumps({"data": MakesMarker(marker), "labels": []}, protocol=2))
    rc, _, err = run_command("--dataset", "cifar10", "--data-dir", root, "--method", "dense", "--epochs", "1",
                             "--quiet", "--no-plots", "--out", tmp_path / "o")
    assert not marker.exists()
    assert rc == 2 and "Traceback" not in err and len(error_lines(err)) == 1
    assert "data_batch_3 refers to io.open" in err and "refused without running it" in err


@pytest.mark.parametrize("method,extra", [
    ("dense", ["--optimizer", "adamw", "--lr", "0.01"]),
    ("static", ["--layout", "bsr", "--block-size", "4", "--lr-schedule", "step"]),
    ("threshold", ["--lr-schedule", "constant"]),
])
def test_checkpoints_hold_only_plain_data_and_resume_exactly(tmp_path, method, extra):
    args = TINY + ["--method", method, *extra]
    assert train.main(args + ["--out", str(tmp_path / "ref")]) == 0
    assert train.main(args + ["--stop-after", "30", "--out", str(tmp_path / "cut")]) == 130
    ck = tmp_path / "cut" / f"checkpoint_{method}.pt"
    state = torch.load(ck, weights_only=True)                 # no pickled globals beyond tensors
    assert all(checkpoint_io.is_plain(v) for v in state["args"].values())
    assert train.main(["--resume", str(ck), "--quiet", "--no-plots"]) == 0
    assert final_run(tmp_path / "cut")["history"] == final_run(tmp_path / "ref")["history"]
    assert final_run(tmp_path / "cut")["state_digest"] == final_run(tmp_path / "ref")["state_digest"]


def test_checkpoint_from_before_paths_were_strings_still_resumes(tmp_path, checkpoint):
    state = read(checkpoint)
    state["args"]["out"] = tmp_path / "old"                   # a PosixPath, as older versions stored it
    torch.save(state, tmp_path / "old.pt")
    assert train.main(["--resume", str(tmp_path / "old.pt"), "--quiet", "--no-plots"]) == 0
    assert (tmp_path / "old" / "results.json").is_file()


# --- 2. no lost work -------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer is a forked process")
def test_checkpoint_write_killed_at_random_points_leaves_a_good_one(tmp_path, checkpoint):
    """A writer saving two real checkpoints in turn is SIGKILLed at seeded random moments (almost
    always inside a write): the file always loads, is one of the two, and resumes."""
    assert train.main(TINY + ["--method", "rigl", "--stop-after", "10", "--out", str(tmp_path / "b")]) == 130
    a, b = checkpoint_io.load(checkpoint), checkpoint_io.load(tmp_path / "b" / "checkpoint_rigl.pt")
    dst = tmp_path / "run" / "checkpoint_rigl.pt"
    rng = random.Random(1234)
    for trial in range(6):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:                                          # the writer: A, B, A, B, ... until killed
            try:
                os.close(read)
                for i in range(10**6):
                    checkpoint_io.save(b if i % 2 else a, dst)
                    if i == 0:
                        os.write(write, b"1")
            finally:
                os._exit(1)
        os.close(write)
        ready = select.select([read], [], [], 60)[0]
        if not ready:
            os.kill(pid, signal.SIGKILL)
        assert ready and os.read(read, 1) == b"1", "the writer wrote no checkpoint in 60 s"  # one is complete
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        got = checkpoint_io.load(dst)                          # whole: the previous good one or the new one
        want = {5: a, 10: b}[len(got["step_times"])]
        assert all(torch.equal(got["model"][k], want["model"][k]) for k in a["model"]), trial
        resumed = tmp_path / f"resumed_{trial}"
        assert train.main(["--resume", str(dst), "--quiet", "--stop-after", str(len(got["step_times"]) + 2),
                           "--out", str(resumed)]) == 130
        assert len(checkpoint_io.load(resumed / "checkpoint_rigl.pt")["step_times"]) == len(got["step_times"]) + 2
    checkpoint_io.save(a, dst)                                # a later write sweeps the killed writers' files
    assert sorted(p.name for p in dst.parent.iterdir()) == [dst.name]


def test_failed_checkpoint_write_keeps_the_previous_file_and_no_temporary(tmp_path, checkpoint, monkeypatch):
    dst = tmp_path / "run" / "c.pt"
    good = checkpoint_io.load(checkpoint)
    checkpoint_io.save(good, dst)
    before = dst.read_bytes()

    def broken(obj, f, *args, **kwargs):
        with opened(f) as fh:
            fh.write(b"half a checkpoint")
            raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_io.save(good, dst)
    assert dst.read_bytes() == before and [p.name for p in dst.parent.iterdir()] == ["c.pt"]


@pytest.fixture
def no_default_signal_handlers():
    """SIGINT/SIGTERM that reach Python's defaults (the command did not handle them) fail the test
    instead of stopping pytest or killing it."""
    def fail(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} was not handled by the command")
    previous = {s: signal.signal(s, fail) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in previous.items():
        signal.signal(s, h)


def test_sigterm_stops_at_a_step_boundary_and_resume_is_exact(tmp_path, monkeypatch, capsys,
                                                             no_default_signal_handlers):
    interrupt_then_resume(tmp_path, monkeypatch, capsys, "set", lambda: os.kill(os.getpid(), signal.SIGTERM))


def test_sigterm_to_the_running_command_leaves_a_checkpoint_that_resumes(tmp_path):
    out = tmp_path / "run"
    ck = out / "checkpoint_rigl.pt"
    proc = subprocess.Popen([sys.executable, "-m", "sparsekern.train", *TINY, "--epochs", "300",
                             "--checkpoint-every", "1", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ck.exists(), proc.communicate()[1] if proc.poll() is not None else "no checkpoint in 90 s"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert error_lines(err)[-1].startswith(f"sparsekern-train: interrupted: checkpoint saved to {ck}")
    state = checkpoint_io.load(ck)
    assert 1 <= state["epoch"] < 300
    done = len(state["step_times"])
    assert train.main(["--resume", str(ck), "--quiet", "--stop-after", str(done + 5)]) == 130
    assert len(checkpoint_io.load(ck)["step_times"]) == done + 5


def test_second_ctrl_c_before_training_exits_cleanly(tmp_path, monkeypatch, capsys, no_default_signal_handlers):
    real = train.datasets.load

    def load_then_ctrl_c_twice(*args, **kwargs):
        ctrl_c_twice()
        return real(*args, **kwargs)
    monkeypatch.setattr(train.datasets, "load", load_then_ctrl_c_twice)
    assert train.main(TINY + ["--method", "rigl", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert error_lines(err) == ["sparsekern-train: SIGINT again: stopped at once; no checkpoint was written"]
    assert not (tmp_path / "checkpoint_rigl.pt").exists()


def test_second_ctrl_c_during_a_step_stops_at_once_keeping_the_last_checkpoint(
        tmp_path, monkeypatch, capsys, no_default_signal_handlers):
    calls = {"n": 0}
    real = train.F.cross_entropy

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30:                               # in epoch 2: the epoch-1 checkpoint exists
            ctrl_c_twice()
        return real(*args, **kwargs)
    monkeypatch.setattr(train.F, "cross_entropy", patched)
    out = tmp_path / "cut"
    ck = out / "checkpoint_rigl.pt"
    assert train.main(TINY + ["--method", "rigl", "--checkpoint-every", "1", "--out", str(out)]) == 130
    assert calls["n"] == 30                                # no further step ran
    assert error_lines(capsys.readouterr().err) == [
        f"sparsekern-train: SIGINT again: stopped at once; the last checkpoint is {ck}; continue with --resume {ck}"]
    state = checkpoint_io.load(ck)
    assert (state["epoch"], state["step"]) == (1, 0)
    monkeypatch.setattr(train.F, "cross_entropy", real)
    assert train.main(["--resume", str(ck), "--quiet", "--no-plots"]) == 0
    assert train.main(TINY + ["--method", "rigl", "--out", str(tmp_path / "ref")]) == 0
    assert final_run(out)["state_digest"] == final_run(tmp_path / "ref")["state_digest"]


def test_second_ctrl_c_during_the_checkpoint_write_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, capsys, no_default_signal_handlers):
    out = tmp_path / "cut"
    ck = out / "checkpoint_rigl.pt"
    calls = {"n": 0}
    real_ce, real_save = train.F.cross_entropy, torch.save

    def ctrl_c_at_step_30(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30:
            os.kill(os.getpid(), signal.SIGINT)
        return real_ce(*args, **kwargs)

    def save_with_ctrl_c_halfway(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with opened(f) as fh:
            fh.write(data[:len(data) // 2])
            if calls["n"] >= 30:                           # the save the first Ctrl-C asked for
                ctrl_c_again()
            fh.write(data[len(data) // 2:])
    monkeypatch.setattr(train.F, "cross_entropy", ctrl_c_at_step_30)
    monkeypatch.setattr(torch, "save", save_with_ctrl_c_halfway)
    assert train.main(TINY + ["--method", "rigl", "--checkpoint-every", "1", "--out", str(out)]) == 130
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("sparsekern-train: SIGINT again: stopped at once; the last "
                                               f"checkpoint is {ck}")
    state = checkpoint_io.load(ck)
    assert (state["epoch"], state["step"]) == (1, 0)          # the epoch-1 checkpoint, whole
    assert sorted(p.name for p in out.iterdir()) == [ck.name]   # and no temporary file


# --- 3. malformed checkpoints, options on --resume ------------------------------------------

def _set(key, value):
    def change(state):
        state[key] = value
    return change


def _set_arg(key, value):
    def change(state):
        state["args"][key] = value
    return change


@pytest.mark.parametrize("change,fragment", [
    (_set("epoch", "x"), "field 'epoch' should be an int >= 0, got str 'x'"),
    (_set("args", ["--epochs", "3"]), "field 'args' should be a table of options"),
    (lambda s: s.pop("model"), "not a sparsekern-train checkpoint (missing ['model'])"),
    (_set("history", "abc"), "field 'history' should be a list of tables"),
    (_set("data_rng", torch.zeros(4)), "field 'data_rng' should be a generator state"),
    (_set("order", torch.arange(5)), "checkpoint does not fit this run (rigl): its data order"),
    (_set("step", 10**6), "checkpoint does not fit this run (rigl): it stopped at epoch 0 step 1000000"),
    (_set("version", 99), "field 'version' should be one of (1,)"),
    (_set("method", "lottery"), "is of a 'lottery' run, but its options say --method rigl"),
    (_set("extra", 1), "has unknown fields ['extra']"),
    (_set_arg("epochs", "x"), "option --epochs is 'x', expected an int"),
    (_set_arg("quiet", "yes"), "option --quiet is 'yes', expected true or false"),
    (_set_arg("layout", "coo"), "option --layout is 'coo', expected one of ('csr', 'bsr')"),
    (_set_arg("colour", "red"), "has unknown options ['colour']"),
])
def test_malformed_checkpoint_is_named_in_one_line(tmp_path, capsys, checkpoint, change, fragment):
    state = read(checkpoint)
    change(state)
    torch.save(state, tmp_path / "bad.pt")
    assert train.main(["--resume", str(tmp_path / "bad.pt"), "--quiet", "--out", str(tmp_path)]) == 2
    err = [line for line in error_lines(capsys.readouterr().err) if "resuming" not in line]  # the --out note
    assert len(err) == 1 and fragment in err[0], err


def test_checkpoint_that_is_not_a_table_is_named(tmp_path, capsys):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert train.main(["--resume", str(tmp_path / "list.pt")]) == 2
    assert "it holds a list, not a table" in capsys.readouterr().err


@pytest.mark.parametrize("flags,fragment", [
    (["--lr", "0.1"], "--lr 0.1 (checkpoint: 0.05) cannot change in a resumed run"),
    (["--width", "80", "--seed", "3"], "--width 80 (checkpoint: 64), --seed 3 (checkpoint: 0) cannot change"),
    (["--dataset", "synthetic"], "--dataset synthetic (checkpoint: digits) cannot change"),
    (["--epochs", "5"], "the cosine LR schedule reaches 0 at the run's planned end (epoch 3)"),
    (["--epochs", "2"], "--epochs can only extend a run"),
])
def test_resume_refuses_options_that_would_change_the_run(tmp_path, capsys, checkpoint, flags, fragment):
    assert train.main(["--resume", str(checkpoint), "--quiet", "--out", str(tmp_path), *flags]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and fragment in err[0], err


def test_resume_accepts_options_given_again_with_the_same_values(tmp_path, capsys, checkpoint):
    assert train.main(["--resume", str(checkpoint), "--quiet", "--lr", "0.05", "--width", "64", "--method", "rigl",
                       "--stop-after", "7", "--out", str(tmp_path)]) == 130
    assert len(checkpoint_io.load(tmp_path / "checkpoint_rigl.pt")["step_times"]) == 7


def test_resume_applies_out_and_extends_epochs_and_says_so(tmp_path, capsys):
    args = TINY + ["--method", "rigl", "--lr-schedule", "constant"]
    assert train.main(args + ["--out", str(tmp_path / "ref")]) == 0
    assert train.main(args + ["--stop-after", "20", "--out", str(tmp_path / "cut")]) == 130
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "cut" / "checkpoint_rigl.pt"), "--epochs", "5", "--out",
                       str(tmp_path / "longer"), "--quiet", "--no-plots"]) == 0
    assert (f"resuming {tmp_path / 'cut' / 'checkpoint_rigl.pt'} with --epochs 5 (was 3), "
            f"--out {tmp_path / 'longer'} (was {tmp_path / 'cut'})") in capsys.readouterr().err
    assert not (tmp_path / "cut" / "results.json").exists()
    longer, ref = final_run(tmp_path / "longer"), final_run(tmp_path / "ref")
    assert len(longer["history"]) == 5 and longer["history"][:3] == ref["history"]   # the first 3 epochs unchanged
    end = checkpoint_io.load(tmp_path / "longer" / "checkpoint_rigl.pt")
    assert end["epoch"] == 5 and end["plan_epochs"] == 3 and end["args"]["epochs"] == 5
