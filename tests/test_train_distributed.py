"""The training command under torchrun: one DDP job over 2 gloo ranks matches a single process
on the same global batch, its ranks stay identical, it resumes exactly, and ranks seeded
differently are refused."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsekern import checkpoint_io, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("train_rank_worker.py"))
# 2 epochs of 11 steps (the last batch of each epoch holds 67 examples), 4 RigL updates
ARGS = ["--method", "rigl", "--width", "32", "--density", "0.3", "--epochs", "2", "--batch-size", "128",
        "--update-every", "4", "--lr-schedule", "constant", "--no-baseline", "--quiet", "--no-plots"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def torchrun(*args, timeout=120):
    """``torchrun --standalone --nproc_per_node 2 -m sparsekern.train ARGS`` (as python -m torch.distributed.run)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sparsekern.train", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(args_of_rank, extra_env=None, timeout=120):
    """Start ranks 0 and 1 by hand (torchrun's environment, no agent); [(returncode, stderr)].
    The free port can be taken between probing and binding: a fresh one, up to 3 times."""
    for _ in range(3):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, WORKER, *map(str, args_of_rank(r))], cwd=ROOT,
                                  env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(extra_env or {})),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        try:
            got = [(p.wait(timeout), p.communicate()[1]) for p in procs]
        finally:
            for p in procs:
                p.kill()
        if not any("address already in use" in err.lower() for _, err in got):
            return got
    return got


def results(out):
    return json.loads((Path(out) / "results.json").read_text())["runs"][0]


def model_state(out):
    return checkpoint_io.load(Path(out) / "checkpoint_rigl.pt")["model"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "full"
    r = torchrun(*ARGS, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_two_ranks_match_one_process_on_the_same_global_batch(two_rank_run, tmp_path):
    out, stdout = two_rank_run
    assert stdout.count("sparse / dense") == 0 and stdout.count("weights (nnz)") == 1   # rank 0 alone prints
    run = results(out)
    digests = run["distributed"]["rank_digests"]
    assert run["distributed"]["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert len([e for e in run["itop_log"] if "itop_rate" in e]) == 4
    assert train.main(ARGS + ["--out", str(tmp_path)]) == 0
    one, two = model_state(tmp_path), model_state(out)
    assert one.keys() == two.keys()
    for k in one:
        if one[k].dtype.is_floating_point:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(two[k], one[k]), k                   # the same topology
    single = results(tmp_path)
    for h1, h2 in zip(single["history"], run["history"]):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-4)
        assert h1["accuracy"] == pytest.approx(h2["accuracy"], abs=2 / 450)


def test_two_rank_run_resumes_exactly(two_rank_run, tmp_path):
    full, _ = two_rank_run
    cut = tmp_path / "cut"
    r = torchrun(*ARGS, "--stop-after", 15, "--out", cut)
    assert r.returncode != 0 and "stopped after 15 steps: checkpoint saved to" in r.stderr, r.stderr[-3000:]
    ck = cut / "checkpoint_rigl.pt"
    assert checkpoint_io.load(ck)["world_size"] == 2
    r = torchrun("--resume", ck, "--quiet", "--no-plots")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = model_state(full), model_state(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results(cut)["history"] == results(full)["history"]


@pytest.mark.parametrize("case", ["seed", "topology"])
def test_ranks_seeded_differently_are_refused(case, tmp_path):
    if case == "seed":                  # each rank given its own --seed
        ranks = two_ranks(lambda r: ARGS + ["--seed", r, "--out", tmp_path])
        fragment = "--seed: rank 0 0, rank 1 1"
    else:                               # the same options, but rank 1's sparsify drew another topology
        ranks = two_ranks(lambda r: ARGS + ["--out", tmp_path], {"SK_TEST_SHIFT_TOPOLOGY": "1"})
        fragment = "rank(s) [1] hold a different model than rank 0"
    for rc, err in ranks:
        assert rc == 2 and fragment in err and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "checkpoint_rigl.pt").exists() and not (tmp_path / "results.json").exists()
