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
