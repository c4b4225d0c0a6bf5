"""Topology structure: construction, conversions, transpose metadata, validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsekern as sk
from sparsekern.formats import BSRTopology, CSRTopology, check_structure

from conftest import make_topology


@st.composite
def topologies(draw):
    layout = draw(st.sampled_from(["csr", "bsr"]))
    b = 1 if layout == "csr" else draw(st.sampled_from([4, 8]))
    R, C = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**20))
    return make_topology(R * b, C * b, density, layout, b, torch.float64, seed=seed), draw(st.integers(1, 12)), seed


@settings(max_examples=60, deadline=None)
@given(topologies())
def test_property_ops_and_structure(case):
    topo, M, seed = case
    topo.validate()
    W = topo.to_dense()
    mask = topo.mask()
    assert int(mask.sum()) == topo.nnz
    # Transpose metadata: W^T's entries, gathered through t_perm, are W's columns.
    rows_t = torch.repeat_interleave(torch.arange(topo.t_offsets.numel() - 1),
                                     (topo.t_offsets[1:] - topo.t_offsets[:-1]).long())
    assert torch.equal(topo.col_indices[topo.t_perm.long()].long(), rows_t)
    assert sorted(topo.t_perm.tolist()) == list(range(topo.values.shape[0]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, topo.shape[1], dtype=torch.float64, generator=g, requires_grad=True)
    y = sk.sparse_linear(x, topo)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y.backward(dy)
    torch.testing.assert_close(y, x.detach() @ W.T)
    torch.testing.assert_close(x.grad, dy @ W)
    torch.testing.assert_close(topo.to_dense(values=topo.values.grad), (dy.T @ x.detach()) * mask)


@pytest.mark.parametrize("layout,b", [("csr", 1), ("bsr", 4), ("bsr", 16)])
def test_dense_and_torch_sparse_round_trips(layout, b):
    topo = make_topology(32, 48, 0.3, layout, b, torch.float32, empty_rows=(1,))
    W = topo.to_dense()
    cls = CSRTopology if layout == "csr" else BSRTopology
    again = cls.from_dense(W) if layout == "csr" else cls.from_dense(W, b)
    assert torch.equal(again.to_dense(), W)
    ts = topo.to_torch_sparse()
    assert ts.layout == (torch.sparse_csr if layout == "csr" else torch.sparse_bsr)
    assert torch.equal(ts.to_dense(), W)
    back = cls.from_torch_sparse(ts)
    assert torch.equal(back.to_dense(), W) and torch.equal(back.col_indices, topo.col_indices)


def test_from_mask_keeps_exact_positions_even_zero_values():
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, 1] = mask[0, 4] = mask[3, 0] = True
    topo = CSRTopology.from_mask(mask, torch.zeros(4, 5))
    assert topo.nnz == 3 and torch.equal(topo.mask(), mask)
    assert topo.row_offsets.tolist() == [0, 2, 2, 2, 3] and topo.col_indices.tolist() == [1, 4, 0]


def test_from_torch_sparse_sorts_and_sums_duplicates():
    i = torch.tensor([[0, 0, 0, 2], [3, 1, 3, 0]])
    coo = torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0, 3.0, 4.0]), (3, 4))
    topo = CSRTopology.from_torch_sparse(coo)
    assert topo.col_indices.tolist() == [1, 3, 0] and topo.values.tolist() == [2.0, 4.0, 4.0]


def corrupt_cases():
    """(field, mutation, error type, message fragment) on a valid CSR [6, 8]."""
    return [
        ("row_offsets", lambda t: t.row_offsets[:-1], ValueError, "row_offsets has"),
        ("row_offsets", lambda t: t.row_offsets.flip(0), ValueError, "row_offsets[0]"),
        ("row_offsets", lambda t: _swap(t.row_offsets, 2, 3), ValueError, "non-decreasing"),
        ("row_offsets", lambda t: t.row_offsets.long(), TypeError, "int32"),
        ("col_indices", lambda t: _set(t.col_indices, 0, 8), ValueError, "out of range"),
        ("col_indices", lambda t: _set(t.col_indices, 0, -1), ValueError, "out of range"),
        ("col_indices", lambda t: t.col_indices[:-1], ValueError, "col_indices has"),
        ("col_indices", lambda t: t.col_indices.float(), TypeError, "int32"),
        ("col_indices", lambda t: _swap(t.col_indices, 0, 1), ValueError, "unsorted"),
        ("col_indices", lambda t: _set(t.col_indices, 1, int(t.col_indices[0])), ValueError, "duplicate"),
        ("values", lambda t: t.values.detach()[:-1], ValueError, "nnz"),
        ("values", lambda t: t.values.detach().int(), TypeError, "floating"),
        ("t_perm", lambda t: t.t_perm.flip(0), ValueError, "t_perm"),
        ("t_offsets", lambda t: t.t_offsets[:-1], ValueError, "t_offsets has"),
        ("t_indices", lambda t: t.t_indices + 1, ValueError, "t_indices"),
    ]


def _set(t, i, v):
    t = t.clone()
    t[i] = v
    return t


def _swap(t, i, j):
    t = t.clone()
    t[i], t[j] = t[j].clone(), t[i].clone()
    return t


def _fixture_topology():
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[0, [1, 3, 6]] = True
    mask[2, [0, 7]] = True
    mask[3, [2]] = True
    mask[5, [1, 2, 3, 4]] = True
    return CSRTopology.from_mask(mask, torch.randn(6, 8))


def fields(t, **override):
    f = dict(values=t.values.detach(), row_offsets=t.row_offsets, col_indices=t.col_indices,
             t_offsets=t.t_offsets, t_indices=t.t_indices, t_perm=t.t_perm)
    f.update(override)
    return f


@pytest.mark.parametrize("field,mutate,exc,fragment", corrupt_cases())
def test_validate_names_the_malformed_field(field, mutate, exc, fragment):
    t = _fixture_topology()
    f = fields(t, **{field: mutate(t)})
    with pytest.raises(exc, match=field if field != "values" else "values") as info:
        check_structure(t.shape, 1, **f)
    assert fragment in str(info.value)


def test_validate_rejects_mismatched_devices_and_bad_bsr():
    t = _fixture_topology()
    with pytest.raises(ValueError, match="col_indices is on meta"):
        check_structure(t.shape, 1, **fields(t, col_indices=t.col_indices.to("meta")))
    with pytest.raises(ValueError, match="block_size"):
        BSRTopology.from_mask(torch.ones(12, 12, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match="multiple of block_size"):
        BSRTopology.from_mask(torch.ones(12, 10, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match=r"values has shape"):
        BSRTopology((8, 8), torch.tensor([0, 1, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                    torch.zeros(1, 4, 2), 4)


def test_constructor_validates():
    with pytest.raises(ValueError, match="col_indices"):
        CSRTopology((2, 3), torch.tensor([0, 1, 2], dtype=torch.int32),
                    torch.tensor([0, 3], dtype=torch.int32), torch.zeros(2))
