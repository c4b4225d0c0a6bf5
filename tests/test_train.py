"""The training command (core): each method on a tiny digits run, and named errors."""
import json
import subprocess
import sys

import pytest

from sparsekern import train


@pytest.mark.parametrize("method", ["dense", "static", "set", "rigl"])
def test_each_method_trains_on_digits(method, tmp_path, capsys):
    out = tmp_path / method
    rc = train.main(["--method", method, "--epochs", "2", "--width", "96", "--density", "0.2",
                     "--update-every", "10", "--no-baseline", "--quiet", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    run = res["runs"][0]
    assert run["final"]["accuracy"] > 0.5                  # chance is 0.1
    if method != "dense":
        rep = run["sparsity_report"]
        assert rep["free_nnz"] == rep["budget"]             # density hits the target exactly
    assert "accuracy" in capsys.readouterr().out


def test_sparse_and_dense_side_by_side(tmp_path, capsys):
    rc = train.main(["--method", "rigl", "--epochs", "1", "--width", "64", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "sparse / dense" in text and "rigl" in text and "dense" in text
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 2


@pytest.mark.parametrize("args,fragment", [
    (["--model", "transformer"], "unknown model 'transformer'; choose one of"),
    (["--method", "lottery"], "unknown method 'lottery'; choose one of"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'; choose one of"),
    (["--density", "0"], "--density must be in (0, 1]"),
    (["--density", "1.5"], "--density must be in (0, 1]"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "does not exist"),
])
def test_user_mistakes_get_one_line_errors(args, fragment, tmp_path, capsys):
    rc = train.main(args + ["--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and "Traceback" not in err


def test_lenet5_on_digit_images(tmp_path):
    rc = train.main(["--model", "lenet5", "--method", "set", "--density", "0.5", "--epochs", "2",
                     "--no-baseline", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["final"]["accuracy"] > 0.3


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "sparsekern.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--method" in out.stdout


TINY = ["--epochs", "3", "--width", "64", "--density", "0.3", "--update-every", "7", "--no-baseline",
        "--quiet", "--no-plots"]


def final_run(out):
    return json.loads((out / "results.json").read_text())["runs"][0]


def test_resume_continues_exactly(tmp_path):
    assert train.main(TINY + ["--method", "rigl", "--out", str(tmp_path / "a")]) == 0
    assert train.main(TINY + ["--method", "rigl", "--stop-after", "40", "--out", str(tmp_path / "b")]) == 130
    ck = tmp_path / "b" / "checkpoint_rigl.pt"
    assert ck.is_file()
    assert train.main(["--resume", str(ck), "--quiet", "--no-plots"]) == 0
    a, b = final_run(tmp_path / "a"), final_run(tmp_path / "b")
    assert a["history"] == b["history"] and a["state_digest"] == b["state_digest"]
    assert len(b["step_times_ms"]) == len(a["step_times_ms"])


def interrupt_then_resume(tmp_path, monkeypatch, capsys, method, interrupt):
    """Run with ``interrupt()`` called inside the 9th loss computation, resume, and compare
    with an uninterrupted run."""
    calls = {"n": 0}
    real = train.F.cross_entropy

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(train.F, "cross_entropy", patched)
    out = tmp_path / "cut"
    assert train.main(TINY + ["--method", method, "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(train.F, "cross_entropy", real)
    assert train.main(["--resume", str(out / f"checkpoint_{method}.pt"), "--quiet", "--no-plots"]) == 0
    ref = tmp_path / "ref"
    assert train.main(TINY + ["--method", method, "--out", str(ref)]) == 0
    assert final_run(out)["history"] == final_run(ref)["history"]
    assert final_run(out)["state_digest"] == final_run(ref)["state_digest"]


def test_keyboard_interrupt_saves_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, capsys):
    def raise_kbi():
        raise KeyboardInterrupt
    interrupt_then_resume(tmp_path, monkeypatch, capsys, "set", raise_kbi)


def test_sigint_stops_at_a_step_boundary_and_resume_is_exact(tmp_path, monkeypatch, capsys):
    import os
    import signal
    interrupt_then_resume(tmp_path, monkeypatch, capsys, "rigl", lambda: os.kill(os.getpid(), signal.SIGINT))


def test_config_files_and_flag_override(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('method = "set"\nepochs = 5\nwidth = 64\ndensity = 0.25\nno-baseline = true\nquiet = true\n')
    assert train.main(["--config", str(toml), "--epochs", "1", "--no-plots", "--out", str(tmp_path / "t")]) == 0
    run = final_run(tmp_path / "t")
    assert run["method"] == "set" and len(run["history"]) == 1      # the flag won over the file
    yml = tmp_path / "run.yaml"
    yml.write_text("method: static\nepochs: 1\nwidth: 64\nno_baseline: true\nquiet: true\n")
    assert train.main(["--config", str(yml), "--no-plots", "--out", str(tmp_path / "y")]) == 0
    assert final_run(tmp_path / "y")["method"] == "static"


def test_plots_are_written(tmp_path):
    assert train.main(["--epochs", "1", "--width", "64", "--quiet", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000 and (tmp_path / "sparsity.png").stat().st_size > 1000


@pytest.mark.parametrize("setup,fragment", [
    (lambda p: p.write_text("methd = 'rigl'\n"), "unknown options ['methd']"),
    (lambda p: p.write_text("method = [unclosed\n"), "is not valid"),
])
def test_bad_config_is_named(tmp_path, capsys, setup, fragment):
    cfg = tmp_path / "bad.toml"
    setup(cfg)
    assert train.main(["--config", str(cfg), "--out", str(tmp_path)]) == 2
    assert fragment in capsys.readouterr().err


def test_bad_checkpoints_are_named(tmp_path, capsys):
    assert train.main(["--resume", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert train.main(["--resume", str(junk)]) == 2
    assert "not readable" in capsys.readouterr().err
    import torch
    torch.save({"model": {}}, tmp_path / "partial.pt")
    assert train.main(["--resume", str(tmp_path / "partial.pt")]) == 2
    assert "not a sparsekern-train checkpoint" in capsys.readouterr().err



def test_baseline_cache_is_reused(tmp_path):
    args = ["--epochs", "1", "--width", "64", "--quiet", "--no-plots", "--baseline", "cache"]
    assert train.main(args + ["--out", str(tmp_path / "one")]) == 0
    assert train.main(args + ["--out", str(tmp_path / "two")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())["runs"][1]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["runs"][1]
    assert "cached_from" not in one and two["cached_from"].endswith(".json")
    assert one["final"] == two["final"]


@pytest.mark.parametrize("schedule", ["constant", "step"])
def test_lr_schedules_run(tmp_path, schedule):
    assert train.main(["--epochs", "2", "--width", "64", "--lr-schedule", schedule, "--no-baseline", "--quiet",
                       "--no-plots", "--out", str(tmp_path)]) == 0


def test_cuda_request_is_refused_with_the_reason(tmp_path, capsys, monkeypatch):
    import torch
    # the same on every machine: as if no CUDA device were visible (with one, --device cuda trains)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main(["--device", "cuda", "--method", "rigl", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is available" in err and "use --device cpu" in err
    assert len(err.strip().splitlines()) == 1                     # one line, no traceback


def test_checkpoint_that_does_not_fit_is_named(tmp_path, capsys):
    import torch
    assert train.main(TINY + ["--method", "set", "--stop-after", "5", "--out", str(tmp_path)]) == 130
    ck = tmp_path / "checkpoint_set.pt"
    state = torch.load(ck, weights_only=False)
    state["args"]["width"] = 80                 # the saved weights are 64 wide
    torch.save(state, ck)
    capsys.readouterr()
    assert train.main(["--resume", str(ck), "--quiet"]) == 2
    assert "checkpoint does not fit this run" in capsys.readouterr().err


@pytest.mark.parametrize("model, width", [("resnet20", []), ("vgg", ["--width", "16"])])
def test_cnn_models_train_on_digit_images(model, width, tmp_path):
    assert train.main(["--model", model, *width, "--method", "static", "--density", "0.5", "--epochs", "1",
                       "--batch-size", "128", "--no-baseline", "--quiet", "--no-plots", "--out", str(tmp_path)]) == 0
    assert final_run(tmp_path)["final"]["accuracy"] > 0.1


def test_image_model_on_flat_data_is_named(tmp_path, capsys):
    assert train.main(["--model", "resnet20", "--dataset", "synthetic", "--out", str(tmp_path)]) == 2
    assert "needs image inputs" in capsys.readouterr().err
