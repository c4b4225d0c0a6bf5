"""Layers built from a drawn (row_offsets, col_indices) structure, as ``sparsify`` builds them:
O(nnz), no dense mask, and exactly the layer a mask of the same positions gives."""
import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import SparseConv2d, SparseLinear
from sparsekern.formats import row_ids
from sparsekern.sampling import random_structure


def mask_of(structure, rows, cols, b=1):
    ro, ci = structure
    m = torch.zeros(rows // b, cols // b, dtype=torch.bool)
    m[row_ids(ro, ci.numel()).long(), ci.long()] = True
    return m.repeat_interleave(b, 0).repeat_interleave(b, 1)


def same(a, b):
    ta, tb = a.topology, b.topology
    for x, y in zip(ta.topology(), tb.topology()):
        assert torch.equal(x, y)
    assert torch.equal(ta.values, tb.values)


@pytest.mark.parametrize("layout,b", [("csr", None), ("bsr", 4)])
def test_linear_and_conv_from_structure_equal_from_mask(layout, b):
    g = torch.Generator().manual_seed(0)
    bb = b or 1
    lin = nn.Linear(24, 16)
    st = random_structure(16 // bb, 24 // bb, 7, g)
    same(SparseLinear.from_dense(lin, structure=st, layout=layout, block_size=b),
         SparseLinear.from_dense(lin, mask=mask_of(st, 16, 24, bb), layout=layout, block_size=b))
    conv = nn.Conv2d(4, 8, 3)
    st = random_structure(8 // bb, 36 // bb, 5, g)
    sc = SparseConv2d.from_dense(conv, structure=st, layout=layout, block_size=b)
    same(sc, SparseConv2d.from_dense(conv, mask=mask_of(st, 8, 36, bb), layout=layout, block_size=b))
    x = torch.randn(2, 4, 6, 6)
    w = conv.weight.detach() * mask_of(st, 8, 36, bb).view_as(conv.weight)
    torch.testing.assert_close(sc(x), nn.functional.conv2d(x, w, conv.bias))


def test_hf_conv1d_from_structure_of_its_transpose():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    c = pytorch_utils.Conv1D(12, 20)                  # nf=12, nx=20: weight [20, 12]
    st = random_structure(12, 20, 30, torch.Generator().manual_seed(1))
    s = sk.SparseConv1D.from_dense(c, structure=st)
    same(s, sk.SparseConv1D.from_dense(c, mask=mask_of(st, 12, 20).t()))
    x = torch.randn(3, 20)
    torch.testing.assert_close(s(x), x @ (c.weight.detach() * mask_of(st, 12, 20).t()) + c.bias)


def test_bad_structure_is_named():
    lin = nn.Linear(8, 6)
    st = random_structure(6, 8, 5, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="exactly one of"):
        SparseLinear.from_dense(lin, mask=mask_of(st, 6, 8), structure=st)
    with pytest.raises(ValueError, match="row_offsets has shape"):
        SparseLinear.from_dense(lin, structure=(st[0][:-1], st[1]))
    bad = st[1].clone()
    bad[0] = 8
    with pytest.raises(ValueError, match="col_indices must be in"):
        SparseLinear.from_dense(lin, structure=(st[0], bad))
    with pytest.raises(TypeError, match="structure must be"):
        SparseLinear.from_dense(lin, structure=st[0])


def test_sparsify_builds_no_dense_mask(monkeypatch):
    """sparsify's draw goes through the structure: the mask builder is never called."""
    import sparsekern.nn._common as common

    def no_mask(*a, **k):
        raise AssertionError("sparsify built a dense mask")
    monkeypatch.setattr(common, "random_mask", no_mask)
    monkeypatch.setattr(common.CSRTopology, "from_mask", classmethod(lambda *a, **k: no_mask()))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    rep = sk.sparsify(model, density=0.3, generator=torch.Generator().manual_seed(0))
    assert isinstance(model[0], SparseConv2d) and isinstance(model[2], SparseLinear)
    assert rep.layers and model(torch.randn(2, 3, 6, 6)).shape == (2, 10)
