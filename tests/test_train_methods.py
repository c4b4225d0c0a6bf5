"""The papers' methods from the training command: each runs on a tiny digits run and
reports what the README table needs."""
import json

import pytest

from sparsekern import train

COMMON = ["--epochs", "4", "--width", "96", "--density", "0.2", "--update-every", "10", "--no-baseline",
          "--quiet", "--no-plots"]


def run(method, tmp_path, *extra):
    out = tmp_path / method
    assert train.main(["--method", method, *COMMON, *extra, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())["runs"][0]


def test_suptickets_from_the_command(tmp_path):
    r = run("suptickets", tmp_path, "--cycle-fraction", "0.5", "--cycle-length", "1", "--superpose", "cima")
    assert r["tickets"] == 3                                   # ticket 0 + 2 cycles
    assert [e["weights"] for e in r["superpose_log"] if "weights" in e] == [[0.5, 0.5], [0.5, 0.5]]
    assert r["final"]["accuracy"] > 0.5 and "current_model" in r
    assert r["train_flops_total"] > 0


@pytest.mark.parametrize("method", ["edst", "ensemble"])
def test_ensembles_from_the_command(method, tmp_path):
    r = run(method, tmp_path, "--tickets", "2", "--grow", "set")
    assert r["tickets"] == 2 and len(r["members"]) == 2
    assert r["final"]["accuracy"] > 0.5
    assert 0 <= r["disagreement"] <= 1 and r["kl"] >= 0
    for key in ("nll", "ece"):
        assert key in r["final"] and all(key in m for m in r["members"])


def test_ensemble_costs_m_runs(tmp_path):
    one = run("rigl", tmp_path)
    ens = run("ensemble", tmp_path, "--tickets", "2")
    assert ens["train_flops_total"] == pytest.approx(2 * one["train_flops_total"])
    assert ens["inference_flops"] == 2 * one["inference_flops"]


def test_threshold_from_the_command(tmp_path):
    r = run("threshold", tmp_path, "--alpha", "0.05", "--lr", "0.1")
    assert r["final"]["accuracy"] > 0.5
    assert 0 < r["threshold_density"] < 1                       # it pruned, and exported sparse layers
    assert r["layer_density"] and all(d < 1 for d in r["layer_density"].values())


def test_methods_refuse_bad_options(tmp_path, capsys):
    assert train.main(["--method", "edst", "--tickets", "0", "--quiet", "--out", str(tmp_path)]) == 2
    assert "--tickets must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["suptickets", "edst"])
def test_resume_inside_the_cyclic_or_refinement_phase_is_exact(method, tmp_path):
    args = ["--method", method, "--epochs", "4", "--width", "64", "--update-every", "10", "--cycle-fraction", "0.5",
            "--tickets", "2", "--quiet", "--no-plots", "--baseline", "skip"]
    assert train.main(args + ["--out", str(tmp_path / "full")]) == 0
    # 4 epochs x 23 steps; the cyclic phase (and EDST's second phase) has begun by step 60
    assert train.main(args + ["--out", str(tmp_path / "cut"), "--stop-after", "60"]) == 130
    assert train.main(["--resume", str(tmp_path / "cut" / f"checkpoint_{method}.pt"), "--quiet", "--no-plots"]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())["runs"][0]
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())["runs"][0]
    assert cut["state_digest"] == full["state_digest"] and cut["final"] == full["final"]
