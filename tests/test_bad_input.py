"""Malformed structures handed straight to the compiled ops raise clear errors.

The kernels must never read out of bounds, whatever tensors reach them, so
these call ``torch.ops.sparsekern.*`` directly, bypassing the Python checks.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsekern as sk
from sparsekern.ops import library as L

from conftest import make_topology


def args(layout="csr", b=1, M=40):
    topo = make_topology(16, 24, 0.5, layout, b, torch.float32, seed=3)
    t = {k: getattr(topo, k).clone() for k in ("row_offsets", "col_indices", "t_offsets", "t_indices", "t_perm")}
    return topo.values.detach().clone(), t, torch.randn(M, 24), torch.randn(M, 16)


def call_all(v, t, x, dy, b):
    topo = (t["row_offsets"], t["col_indices"], t["t_offsets"], t["t_indices"], t["t_perm"])
    L.spmm(x, v, *topo, None)
    L.spmm_t(dy, v, *topo)
    L.sddmm(dy, x, *topo, b)


def _set(t, key, i, val):
    t[key] = t[key].clone()
    t[key][i] = val


CASES = [
    ("col out of range", lambda v, t: _set(t, "col_indices", 0, 10_000), ValueError, "col_indices"),
    ("negative col", lambda v, t: _set(t, "col_indices", 3, -5), ValueError, "col_indices"),
    ("perm out of range", lambda v, t: _set(t, "t_perm", 1, 1 << 30), ValueError, "t_perm"),
    ("t_indices out of range", lambda v, t: _set(t, "t_indices", 2, 999), ValueError, "t_indices"),
    ("offsets decrease", lambda v, t: _set(t, "row_offsets", 3, 10_000), ValueError, "row_offsets"),
    ("offsets end", lambda v, t: _set(t, "row_offsets", -1, 3), ValueError, "row_offsets"),
    ("t_offsets end", lambda v, t: _set(t, "t_offsets", -1, 1), ValueError, "t_offsets"),
    ("int64 indices", lambda v, t: t.__setitem__("col_indices", t["col_indices"].long()), TypeError, "int32"),
    ("short col_indices", lambda v, t: t.__setitem__("col_indices", t["col_indices"][:-1]), ValueError, "col_indices has"),
    ("short perm", lambda v, t: t.__setitem__("t_perm", t["t_perm"][:-2]), ValueError, "t_perm has"),
    ("2-D offsets", lambda v, t: t.__setitem__("row_offsets", t["row_offsets"][None]), ValueError, "1-D"),
]


@pytest.mark.parametrize("M", [1, 40, 200])
@pytest.mark.parametrize("name,mutate,exc,fragment", CASES, ids=[c[0] for c in CASES])
def test_malformed_csr_never_crashes(name, mutate, exc, fragment, M, ext_required):
    v, t, x, dy = args(M=M)
    good = tuple(t.values())
    mutate(v, t)
    try:
        call_all(v, t, x, dy, 1)
    except exc as e:
        assert fragment in str(e)
    else:
        # Large batches compute dX in scatter form from (row_offsets, col_indices)
        # and never read W^T's metadata; then the result must be the true dX.
        assert name in ("perm out of range", "t_indices out of range", "t_offsets end"), f"{name}: no error"
        bad = tuple(t.values())
        torch.testing.assert_close(L.spmm_t(dy, v, *bad), L.spmm_t(dy, v, *good))
        with pytest.raises(exc, match=fragment):   # the gather form (batch 1) reads it and refuses
            L.spmm_t(dy[:1], v, *bad)


@pytest.mark.parametrize("name,mutate,exc,fragment", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_malformed_bsr_never_crashes(name, mutate, exc, fragment, ext_required):
    v, t, x, dy = args("bsr", 4)
    mutate(v, t)
    with pytest.raises(exc, match=fragment.replace("col_indices", "col_indices|t_indices|t_perm")):
        call_all(v, t, x, dy, 4)


def test_mismatched_operands(ext_required):
    v, t, x, dy = args()
    topo = tuple(t.values())
    with pytest.raises(ValueError, match="x has 23 features, expected 24"):
        L.spmm(x[:, :23], v, *topo, None)
    with pytest.raises(TypeError, match="x has dtype Double but values have dtype Float"):
        L.spmm(x.double(), v, *topo, None)
    with pytest.raises(ValueError, match="bias must be"):
        L.spmm(x, v, *topo, torch.zeros(3))
    with pytest.raises(ValueError, match=r"must share their leading dims, got \[39, 16\] and \[40, 24\]"):
        L.sddmm(dy[:39], x, *topo, 1)
    with pytest.raises(ValueError, match="block_size"):
        L.sddmm(dy, x, *topo, 3)
    with pytest.raises(ValueError, match="values must be 1-D"):
        L.spmm(x, v[:, None], *topo, None)
    topo_obj = make_topology(16, 24, 0.5, "csr", 1, torch.float32, seed=3)
    with pytest.raises(ValueError, match="x is on meta but the weight is on cpu"):
        sk.sparse_linear(x.to("meta"), topo_obj)


def test_import_without_extension_warns_and_explains():
    code = textwrap.dedent("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.startswith("sparsekern._C"):
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import torch, sparsekern as sk
        assert sum("compiled kernels are unavailable" in str(x.message) for x in w) == 1, w
        assert not sk.extension_available()
        lin = sk.SparseLinear(8, 4, density=0.5, dtype=torch.float64)
        x = torch.randn(2, 8, dtype=torch.float64)
        try:
            lin(x)
        except NotImplementedError as e:
            assert "not built" in str(e) and "reference" in str(e), e
        else:
            raise AssertionError("auto backend ran without the extension")
        try:
            torch.ops.sparsekern.spmm(x, lin.topology.values, *lin.topology.topology(), None)
        except sk._ext.ExtensionNotBuiltError as e:
            assert "scripts/setup.sh" in str(e), e
        else:
            raise AssertionError("op ran without the extension")
        lin.backend = "reference"
        torch.testing.assert_close(lin(x), lin.to_dense()(x))
        # RigL's selection still runs (the growth scan's torch form serves CPU then)
        from sparsekern.dst.selection import RunningTopK
        top = RunningTopK(2, torch.tensor([5], dtype=torch.int64))
        top.add(torch.tensor([0.5, 3.0, 2.0]), 0)                 # sets the bound (2.0)
        top.add(torch.tensor([-4.0, float("nan"), 9.0]), 3, absolute=True)   # the scan: 4.0 in, 9.0 kept
        assert top.result().tolist() == [1, 3], top.result()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
