"""sparsekern::csr_transpose (the transpose metadata): the CPU counting sort against the
torch-ops stable sort and against a plain loop, at 1, 2 and 3 threads, on empty rows,
empty structures, int32/int64 inputs and BSR-sized structures; a malformed structure
(it may come from a file) is refused with the field named, before anything is written."""
import pytest
import torch

import sparsekern as sk
from sparsekern.ops.transpose import csr_transpose, reference

pytestmark = pytest.mark.skipif(not sk.extension_available(), reason="extension not built")


def structure(R, C, density, seed, dtype=torch.int32, empty_rows=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(R, C, generator=g) < density
    if empty_rows and R > 2:
        mask[1] = False
        mask[R - 1] = False
    counts = mask.sum(1)
    ro = torch.zeros(R + 1, dtype=dtype)
    ro[1:] = torch.cumsum(counts, 0)
    return ro, torch.nonzero(mask)[:, 1].to(dtype)


def loop(ro, ci, C):
    """The definition: entries of W^T column by column of W, each in W's row order."""
    ro, ci = ro.tolist(), ci.tolist()
    per = [[] for _ in range(C)]
    for r in range(len(ro) - 1):
        for e in range(ro[r], ro[r + 1]):
            per[ci[e]].append((r, e))
    off = [0]
    for p in per:
        off.append(off[-1] + len(p))
    return off, [r for p in per for r, _ in p], [e for p in per for _, e in p]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("R,C,density", [(0, 5, 0.5), (4, 0, 0.5), (1, 1, 1.0), (7, 13, 0.0), (7, 13, 1.0),
                                         (33, 17, 0.3), (500, 300, 0.05), (3, 5000, 0.2)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_kernel_equals_reference_and_definition(threads, R, C, density, dtype):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ro, ci = structure(R, C, density, seed=R * 31 + C, dtype=dtype)
        got = csr_transpose(ro, ci, C)
        want = reference(ro, ci, C)
        for g, w in zip(got, want):
            assert g.dtype == torch.int32 and torch.equal(g, w)
        if R * C <= 2000:
            assert [t.tolist() for t in got] == list(loop(ro, ci, C))
    finally:
        torch.set_num_threads(old)


def test_topologies_keep_a_transpose_that_matches_the_reference():
    m = sk.SparseLinear(300, 200, density=0.1, layout="bsr", block_size=4, generator=torch.Generator().manual_seed(2))
    t = m.topology
    want = reference(t.row_offsets, t.col_indices, t.shape[1] // t.block_size)
    for got, w in zip((t.t_offsets, t.t_indices, t.t_perm), want):
        assert torch.equal(got, w)


def _args(**bad):
    ro, ci = structure(6, 10, 0.4, seed=5)
    args = dict(row_offsets=ro, col_indices=ci, n_cols=10)
    args.update(bad)
    return args


@pytest.mark.parametrize("bad,err,match", [
    (dict(row_offsets=torch.zeros(3, dtype=torch.float32)), TypeError, "row_offsets must be int32 or int64"),
    (dict(col_indices=torch.zeros(3, dtype=torch.int16)), TypeError, "col_indices must be int32 or int64"),
    (dict(n_cols=-1), ValueError, "n_cols must be >= 0"),
    (dict(n_cols=3), ValueError, r"col_indices\[\d+\] = \d+ is outside \[0, 3\)"),
    (dict(col_indices=torch.zeros((2, 2), dtype=torch.int32)), ValueError, "col_indices must be 1-D"),
])
def test_bad_input_is_named(bad, err, match):
    a = _args(**bad)
    with pytest.raises(err, match=match):
        csr_transpose(a["row_offsets"], a["col_indices"], a["n_cols"])


def test_a_malformed_structure_is_refused_before_any_write():
    ro, ci = structure(6, 10, 0.4, seed=5)
    cases = [(torch.cat([ro[:1] + 1, ro[1:]]), ci, r"row_offsets\[0\] must be 0"),
             (torch.cat([ro[:-1], ro[-1:] + 1]), ci, r"row_offsets\[-1\] = \d+ but col_indices has \d+ entries"),
             (ro.flip(0).contiguous(), ci, "row_offsets"),
             (ro, torch.cat([ci[:-1], torch.tensor([-1], dtype=ci.dtype)]), r"is outside \[0, 10\)")]
    for r, c, match in cases:
        with pytest.raises(ValueError, match=match):
            csr_transpose(r, c, 10)
    bump = ro.clone()
    bump[3] = bump[4] + 1                     # decreasing at row 3
    bump[2] = min(int(bump[2]), int(bump[3]))
    with pytest.raises(ValueError, match="row_offsets decreases at row 3"):
        csr_transpose(bump, ci, 10)


def test_cpu_runs_the_compiled_kernel_and_other_backends_the_torch_form():
    name = "sparsekern::csr_transpose"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd")


def test_opcheck():
    ro, ci = structure(40, 30, 0.2, seed=3)
    torch.library.opcheck(torch.ops.sparsekern.csr_transpose.default, (ro, ci, 30),
                          test_utils=("test_schema", "test_faketensor"))
