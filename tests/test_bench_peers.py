"""The CPU benchmarks' peers: SparseProp (linear, conv) and rigl-torch (DST). Without the package
the columns say "not installed" and the benchmark still runs; with it, a peer is checked against
dense before it is timed, on the same nonzero positions, and a wrong result is never timed."""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _rigl_torch_peer as rigl_peer  # noqa: E402
import _sparseprop_peer as sp_peer  # noqa: E402
import bench_conv_cpu  # noqa: E402
import bench_dst_cpu  # noqa: E402
import bench_linear_cpu  # noqa: E402

import sparsekern as sk  # noqa: E402
from conftest import num_threads  # noqa: E402
from sparsekern.models import mlp  # noqa: E402


@pytest.fixture
def no_sparseprop(monkeypatch):
    """An import of sparseprop fails as if it were not installed."""
    for name in [n for n in sys.modules if n == "sparseprop" or n.startswith("sparseprop.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sparseprop", None)


def needs_sparseprop():
    mods, why = sp_peer.load()
    if mods is None:
        pytest.skip(f"sparseprop: {why}")
    return mods


def tiny_linear_rows():
    """bench_linear_cpu's rows for 64->32 at batch 16, density 0.25, CSR and BSR16, one thread."""
    with num_threads(1):
        return bench_linear_cpu.run([(64, 32)], [16], [0.25], 1, 1, peak=100.0)


META = {"cpu": "test", "threads": 1, "torch": "t", "date": "now", "reps": 1,
        "fma_peak": {"gflops": 100.0, "threads": 1, "isa": "avx2-fma", "accumulators": 12}}


def test_sparseprop_missing_says_not_installed(no_sparseprop):
    assert sp_peer.load() == (None, "not installed")
    lin = sk.SparseLinear(64, 32, density=0.25)
    r = sp_peer.linear(lin, torch.randn(16, 64), torch.randn(16, 32), 1)
    assert r == {"status": "not installed", "reason": "not installed", "ms": None}


def test_linear_bench_runs_without_sparseprop_and_has_the_columns(no_sparseprop):
    rows = tiny_linear_rows()
    assert [r["sparseprop"]["status"] for r in rows] == ["not installed", "not installed"]
    md = bench_linear_cpu.markdown(rows, META)
    for col in ("fwd vs SparseProp", "fwd+bwd vs SparseProp", "dense GFLOP/s", "sparse eff. GFLOP/s",
                "% of dense rate", "% of FMA peak", "fraction of ideal", "FMA peak"):
        assert col in md, col
    assert "| not installed | not installed |" in md
    r = rows[0]
    lin_nnz = r["flops"]["useful"] // (2 * 16)
    assert r["flops"]["dense"] == 2 * 16 * 64 * 32 and 0 < lin_nnz < 64 * 32
    t = r["throughput"]["fwd"]
    assert t["sparse_eff_gflops"] == pytest.approx(r["flops"]["useful"] / (r["sparsekern_ms"]["fwd"] * 1e6))
    assert t["frac_of_fma_peak"] == pytest.approx(t["sparse_eff_gflops"] / 100.0)


def test_conv_bench_runs_without_sparseprop_and_has_the_columns(no_sparseprop):
    with num_threads(1):
        rows = bench_conv_cpu.run([("3x3 16->16 6x6", 16, 16, 3, 6, 8)], bench_conv_cpu.LAYOUTS[:1], [0.25], 1, 1,
                                  peak=None)
    (r,) = rows
    assert r["sparseprop"]["status"] == "not installed"
    conv_nnz = r["flops"]["useful"] // (2 * 8 * 36)
    assert r["flops"]["dense"] == 2 * 8 * 36 * 16 * 16 * 9 and 0 < conv_nnz < 16 * 144
    assert r["throughput"]["fwd+bwd"]["frac_of_fma_peak"] is None          # no peak measured
    md = bench_conv_cpu.markdown(rows, {**META, "fma_peak": {"gflops": None, "error": "gcc not found"}})
    assert "fwd+bwd vs SparseProp" in md and "not installed" in md and "FMA peak: not measured" in md


def test_sparseprop_linear_is_checked_against_dense_then_timed():
    needs_sparseprop()
    rows = tiny_linear_rows()
    csr, bsr = rows
    assert csr["sparseprop"]["status"] == "ok", csr["sparseprop"]
    chk = csr["sparseprop"]["check"]["csr"]
    assert max(chk["max_rel_err"].values()) <= chk["allclose_rtol"]
    assert all(csr["sparseprop"]["ms"][k] > 0 for k in ("fwd", "fwd+bwd"))
    assert csr["sparseprop"]["threads"] == 1
    assert bsr["sparseprop"]["status"] == "not applicable" and "BSR" in bsr["sparseprop"]["reason"]
    md = bench_linear_cpu.markdown(rows, META)
    assert "SparseProp not applicable: BSR layout" in md


def test_sparseprop_conv_both_variants_checked():
    needs_sparseprop()
    torch.manual_seed(0)
    conv = sk.SparseConv2d(16, 16, 3, padding=1, bias=False, density=0.25)
    x = torch.randn(8, 16, 6, 6)
    dy = torch.randn_like(conv(x))
    r = sp_peer.conv(conv, x, dy, 1)
    assert r["status"] == "ok", r
    assert set(r["check"]) == {"over_batch", "over_on"}
    for rec in r["check"].values():
        assert max(rec["max_rel_err"].values()) <= rec["allclose_rtol"]
    assert r["variant"]["fwd"] in r["check"]


def test_sparseprop_wrong_result_is_never_timed(monkeypatch):
    """A peer whose weights drifted from sparsekern's is caught by the dense check and not timed."""
    needs_sparseprop()
    torch.manual_seed(0)
    lin = sk.SparseLinear(64, 32, density=0.25)
    real = sp_peer.linear_variants

    def corrupted(m, layer):
        variants = real(m, layer)
        with torch.no_grad():
            variants["csr"].layer.W_val[0] += 1.0
        return variants

    timed = []
    monkeypatch.setattr(sp_peer, "median_ms_each", lambda fns, reps: timed.append(1) or {})
    r = sp_peer.measure(corrupted, lin, torch.randn(16, 64), torch.randn(16, 32), 1)
    assert r["status"] == "mismatch" and "forward" in r["reason"] and r["ms"] is None
    assert timed == []


def test_sparseprop_must_store_sparsekerns_positions():
    """SparseProp builds from a dense weight and drops zeros: a stored zero would change the positions."""
    needs_sparseprop()
    torch.manual_seed(0)
    lin = sk.SparseLinear(64, 32, density=0.25)
    with torch.no_grad():
        lin.topology.values[3] = 0.0
    r = sp_peer.linear(lin, torch.randn(16, 64), torch.randn(16, 32), 1)
    assert r["status"] == "mismatch" and "positions" in r["reason"] and r["ms"] is None


def test_sparseprop_conv_geometry_it_lacks_is_not_applicable():
    needs_sparseprop()
    conv = sk.SparseConv2d(8, 8, 3, padding=1, dilation=2, bias=False, density=0.5)
    r = sp_peer.conv(conv, torch.randn(8, 8, 6, 6), torch.randn(8, 8, 4, 4), 1)
    assert r["status"] == "not applicable" and "dilation" in r["reason"]


def test_rigl_torch_missing_says_not_installed(monkeypatch):
    for name in [n for n in sys.modules if n == "rigl_torch" or n.startswith("rigl_torch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rigl_torch", None)
    had_tv = "torchvision" in sys.modules
    assert rigl_peer.load() == (None, "not installed")
    assert ("torchvision" in sys.modules) == had_tv             # no stub left behind
    results = {"dense": {"status": "ok", "step_s": 0.1, "round_robin_step_s": 0.1, "param_bytes": 100},
               bench_dst_cpu.RIGL_TORCH: {"status": "not installed"},
               "sparsekern RigL": {"status": "ok", "step_s": 0.02, "round_robin_step_s": 0.04, "param_bytes": 20}}
    bench_dst_cpu.add_rates(results, {"dense": 1e10, "useful": 1e9}, 200.0)
    md = "\n".join(bench_dst_cpu.step_table(META, results))
    assert f"| {bench_dst_cpu.RIGL_TORCH} | not installed |" in md
    assert bench_dst_cpu.peer_line(results) == "rigl-torch: not installed."
    for col in ("GFLOP/s", "% of dense rate", "% of FMA peak"):
        assert col in md
    assert results["dense"]["gflops"] == pytest.approx(100.0)
    assert results["sparsekern RigL"]["gflops"] == pytest.approx(50.0)
    assert "| 100.0 | 100.0% | 50.0% |" in md and "| 50.0 | 50.0% | 25.0% |" in md


def test_rigl_torch_runs_on_sparsekerns_masks():
    cls, why = rigl_peer.load()
    if cls is None:
        pytest.skip(f"rigl-torch: {why}")
    assert getattr(sys.modules.get("torchvision"), "__file__", "absent") is not None   # no stub left behind
    torch.manual_seed(0)
    base = mlp((16, 32, 32, 4))
    sparse = copy.deepcopy(base)
    sk.sparsify(sparse, 0.25, "erk", init="dense", generator=torch.Generator().manual_seed(1))
    masks = {n: m.topology.mask() for n, m in sparse.named_modules() if isinstance(m, sk.SparseLinear)}
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = rigl_peer.scheduler(cls, model, opt, masks, total_steps=100, update_every=3, drop_fraction=0.3)
    for n, m in masks.items():
        assert torch.equal(model.get_submodule(n).weight != 0, m)
    step = rigl_peer.SchedulerStep(opt, sched)
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        step.zero_grad()
        F.cross_entropy(model(torch.randn(8, 16, generator=g)), torch.randint(0, 4, (8,), generator=g)).backward()
        step.step()
    assert sched.rigl_steps == 2
    for (n, m), bm in zip(masks.items(), [b for b in sched.backward_masks if b is not None]):
        assert bm.sum() == m.sum()                                 # rewired at the same density
        assert not torch.equal(bm, m)
        assert not (model.get_submodule(n).weight[~bm] != 0).any()
    assert len(step.masks()) == len(masks)
    with pytest.raises(ValueError, match="no weighted layer"):
        rigl_peer.scheduler(cls, copy.deepcopy(base), opt, {"nope": masks["0"]}, 10, 3, 0.3)
