"""sparsekern::free_candidates (RigL growth's one-pass tile scan): the CPU kernel against
the torch-ops reference and against a plain Python loop, at 1 and 2 threads, on tiles
with NaN/Inf, ties at the threshold, kept entries across chunk boundaries, and bad input."""
import math

import pytest
import torch

import sparsekern as sk
from sparsekern.ops.candidates import _checked, free_candidates, reference

pytestmark = pytest.mark.skipif(not sk.extension_available(), reason="extension not built")

CHUNK = 1 << 16          # the kernel's work item (csrc/cpu/free_candidates_cpu.cpp)


def loop(scores, threshold, absolute, kept, start):
    """The definition, one entry at a time."""
    kept = set(kept.tolist())
    pos, val = [], []
    for i, s in enumerate(scores.reshape(-1).tolist()):
        v = abs(s) if absolute else s
        if math.isfinite(v) and v > threshold and start + i not in kept:
            pos.append(start + i)
            val.append(v)
    return pos, val


def tile(n, dtype, seed, specials=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    if specials and n:
        idx = torch.randint(0, n, (max(1, n // 50),), generator=g)
        s[idx[0::4]] = float("nan")
        s[idx[1::4]] = float("inf")
        s[idx[2::4]] = -float("inf")
        s[idx[3::4]] = 1.5                      # exact ties with the threshold below
    return s


def kept_for(n, start, seed, frac=0.3):
    g = torch.Generator().manual_seed(seed + 1)
    inside = torch.nonzero(torch.rand(n, generator=g) < frac).flatten() + start
    outside = torch.tensor([0, max(0, start - 1), start + n, start + n + 7], dtype=torch.int64)
    return torch.unique(torch.cat([inside, outside]))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("n,start", [(0, 0), (1, 5), (17, 0), (1000, 123), (3 * CHUNK + 11, 10 ** 9)])
def test_kernel_equals_reference_and_definition(threads, dtype, absolute, n, start):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s = tile(n, dtype, seed=n + threads)
        kept = kept_for(n, start, seed=n)
        pos, val = free_candidates(s, 1.5, absolute, kept, start)
        rpos, rval = reference(s, 1.5, absolute, kept, start)
        assert pos.dtype == torch.int64 and val.dtype == dtype
        assert torch.equal(pos, rpos) and torch.equal(val, rval)
        if n <= 1000:
            lpos, lval = loop(s, 1.5, absolute, kept, start)
            assert pos.tolist() == lpos and val.tolist() == lval
        assert bool((pos[1:] > pos[:-1]).all())
    finally:
        torch.set_num_threads(old)


def test_two_dimensional_tile_is_read_row_major_and_left_unchanged():
    g = tile(64 * 300, torch.float32, seed=3).reshape(64, 300)
    before = g.clone()
    kept = kept_for(g.numel(), 4096, seed=3)
    pos, val = free_candidates(g, 0.5, True, kept, 4096)
    torch.testing.assert_close(g, before, rtol=0, atol=0, equal_nan=True)
    rpos, rval = reference(g.flatten(), 0.5, True, kept, 4096)
    assert torch.equal(pos, rpos) and torch.equal(val, rval) and pos.numel() > 0


def test_kept_entries_at_chunk_edges_are_excluded():
    n = 2 * CHUNK + 3
    s = torch.full((n,), 2.0)
    kept = torch.tensor([CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, n - 1], dtype=torch.int64)
    pos, _ = free_candidates(s, 1.0, False, kept, 0)
    assert pos.numel() == n - kept.numel()
    assert not bool(torch.isin(pos, kept).any())


def test_same_result_at_every_thread_count():
    s = tile(5 * CHUNK, torch.float32, seed=9)
    kept = kept_for(s.numel(), 0, seed=9)
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(free_candidates(s, 0.8, True, kept, 0))
    finally:
        torch.set_num_threads(old)
    for pos, val in outs[1:]:
        assert torch.equal(pos, outs[0][0]) and torch.equal(val, outs[0][1])


@pytest.mark.parametrize("bad,err,match", [
    (dict(scores=torch.zeros(4, dtype=torch.int32)), TypeError, "scores must be float32 or float64"),
    (dict(scores=torch.zeros(4, dtype=torch.bfloat16)), TypeError, "scores must be float32 or float64"),
    (dict(kept=torch.zeros(2, dtype=torch.int32)), TypeError, "kept must be int64"),
    (dict(kept=torch.zeros(2, 1, dtype=torch.int64)), ValueError, "kept must be 1-D"),
    (dict(start=-1), ValueError, "start must be >= 0"),
    (dict(threshold=float("nan")), ValueError, "threshold must not be NaN"),
])
def test_bad_input_is_named(bad, err, match):
    args = dict(scores=torch.ones(4), threshold=0.5, absolute=False,
                kept=torch.zeros(0, dtype=torch.int64), start=0)
    args.update(bad)
    with pytest.raises(err, match=match):
        free_candidates(args["scores"], args["threshold"], args["absolute"], args["kept"], args["start"])


def test_threshold_is_compared_in_the_scores_dtype_as_torch_does():
    s = torch.tensor([0.8, 0.80000001, 0.79999995, 0.9], dtype=torch.float32)
    pos, _ = free_candidates(s, 0.8, False, torch.zeros(0, dtype=torch.int64), 0)
    rpos, _ = reference(s, 0.8, False, torch.zeros(0, dtype=torch.int64), 0)
    assert torch.equal(pos, rpos) and pos.tolist() == torch.nonzero(s > 0.8).flatten().tolist()


def test_cpu_runs_the_compiled_kernel_and_other_backends_the_torch_form():
    name = "sparsekern::free_candidates"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd")


def test_opcheck():
    s = tile(3000, torch.float32, seed=1)
    kept = kept_for(3000, 0, seed=1)
    torch.library.opcheck(torch.ops.sparsekern.free_candidates.default, (s, 1.5, True, kept, 0),
                          test_utils=("test_schema", "test_faketensor"))


def loop_2d(scores, threshold, absolute, kept, start, stride):
    """The 2-D block definition: entry (i, j) is position start + i * stride + j."""
    kept = set(kept.tolist())
    pos, val = [], []
    for i, row in enumerate(scores.tolist()):
        for j, s in enumerate(row):
            v = abs(s) if absolute else s
            p = start + i * stride + j
            if math.isfinite(v) and v > threshold and p not in kept:
                pos.append(p)
                val.append(v)
    return pos, val


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("h,w,stride,start", [(1, 1, 1, 0), (3, 5, 5, 7), (20, 33, 1000, 12345),
                                               (40, 2000, 70000, 10 ** 9), (200, 700, 700, 3), (0, 4, 9, 0)])
def test_block_with_a_row_stride_equals_reference_and_definition(threads, dtype, absolute, h, w, stride, start):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s = tile(h * w, dtype, seed=h + w).reshape(h, w)
        span = max(1, (h - 1) * stride + w) if h else 1
        kept = kept_for(span, start, seed=w, frac=0.002 if span > 10 ** 6 else 0.3)
        pos, val = free_candidates(s, 1.5, absolute, kept, start, stride)
        rpos, rval = reference(s, 1.5, absolute, kept, start, stride)
        assert torch.equal(pos, rpos) and torch.equal(val, rval)
        if h * w <= 20000:
            lpos, lval = loop_2d(s, 1.5, absolute, kept, start, stride)
            assert pos.tolist() == lpos and val.tolist() == lval
        assert bool((pos[1:] > pos[:-1]).all())
    finally:
        torch.set_num_threads(old)


def test_block_kept_entries_far_apart_are_found_by_the_galloping_cursor():
    # rows 10^6 positions apart with thousands of kept entries between them, some in the rows
    h, w, stride = 50, 64, 10 ** 6
    s = torch.full((h, w), 3.0)
    between = torch.arange(0, h * stride, 97, dtype=torch.int64)
    inside = torch.tensor([i * stride + j for i in range(h) for j in (0, 5, w - 1)], dtype=torch.int64)
    kept = torch.unique(torch.cat([between, inside]))
    pos, _ = free_candidates(s, 1.0, False, kept, 0, stride)
    want = torch.tensor([i * stride + j for i in range(h) for j in range(w)], dtype=torch.int64)
    want = want[~torch.isin(want, kept)]
    assert torch.equal(pos, want)


@pytest.mark.parametrize("scores,stride,match", [
    (torch.ones(4), 4, "with stride > 0, scores must be 2-D"),
    (torch.ones(2, 5), 4, r"a row of scores \(5 entries\) is wider than stride \(4\)"),
    (torch.ones(2, 2), -1, "stride must be >= 0"),
])
def test_bad_stride_is_named(scores, stride, match):
    with pytest.raises(ValueError, match=match):
        free_candidates(scores, 0.5, False, torch.zeros(0, dtype=torch.int64), 0, stride)
    with pytest.raises(ValueError, match=match):        # the torch form other devices run
        _checked(scores, 0.5, False, torch.zeros(0, dtype=torch.int64), 0, stride)
