"""A RigL run on the GPU path: the DST engine's in-place rebuild between forward/backward passes
through the GPU kernels (on a GPU, or on CPU tensors inside ``cuda_path_on_cpu`` under the
Triton interpreter).

What a CUDA run does that the CPU path does not, each exercised here:

* every op goes through the router and the Triton launchers, whose schedules and validations
  are cached per topology version (:mod:`sparsekern.gpu.schedule`): the engine rewrites the
  index tensors in place (``copy_`` bumps ``_version``), and the next pass must use the new
  structure (a stale schedule would read the old rows and fail the reference comparison);
* ``update_topology`` marks the rebuilt structure valid (``schedule.mark_validated``) so the
  next GPU call skips re-validation. It takes that branch for CUDA values only, so on CPU the
  test takes it explicitly, checks that no re-validation happens, and that what it vouched
  for is valid;
* the transpose is rebuilt by ``transpose_metadata`` with device-side ops only (the same code
  on both devices; that it never syncs is checked on a GPU by
  tests/test_triton.py::test_gpu_rebuild_reads_nothing_back_per_nonzero).
"""
import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import formats
from sparsekern.dst import engine as dst_engine
from sparsekern.dst.rebuild import active_positions
from sparsekern.gpu import INTERPRET, schedule
from sparsekern.ops import reference as ref
from tests.conftest import assert_gpu_path, make_conv, make_linear

ON_GPU = torch.cuda.is_available() and not INTERPRET
DEV = "cuda" if ON_GPU else "cpu"


class Net(nn.Module):
    """A sparse conv (CSR), a CSR linear and a BSR16 linear: every layout the engine rewires."""

    def __init__(self):
        super().__init__()
        self.conv = make_conv(2, 4, 3, density=0.4, seed=1, padding=1, device=DEV)
        self.fc1 = make_linear(36, 32, density=0.3, seed=2, device=DEV)
        self.fc2 = make_linear(32, 48, "bsr", 16, density=0.5, seed=3, device=DEV)

    def forward(self, x):
        return self.fc2(self.fc1(self.conv(x).relu().flatten(1)).relu())

    def reference(self, x):
        """The same network in float64 through the reference ops (the current topologies)."""
        c, f1, f2 = self.conv, self.fc1.topology, self.fc2.topology
        h = ref.conv2d(x.double(), c.topology.values.double(), *c.topology.topology(), c.bias.double(),
                       list(c.geometry)).relu().flatten(1)
        h = ref.spmm(h, f1.values.double(), *f1.topology(), self.fc1.bias.double()).relu()
        return ref.spmm(h, f2.values.double(), *f2.topology(), self.fc2.bias.double())


def layers(net):
    return {"conv": net.conv.topology, "fc1": net.fc1.topology, "fc2": net.fc2.topology}


def test_rigl_updates_between_gpu_passes(monkeypatch, on_gpu_path):
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    engine = sk.dst.RigL(net, opt, total_steps=2, update_every=1, drop_fraction=0.5, schedule="constant",
                         stop_at=1.0)
    real_update = dst_engine.update_topology
    checks = []

    def update_as_on_cuda(topo, drop, grow, positions=None):
        src = real_update(topo, drop, grow, positions)
        if not topo.values.is_cuda:              # the branch update_topology takes for CUDA values
            schedule.mark_validated(topo.values, *topo.topology())
        return src

    real_check = formats.check_structure
    monkeypatch.setattr(dst_engine, "update_topology", update_as_on_cuda)
    monkeypatch.setattr(formats, "check_structure", lambda *a, **k: checks.append(1) or real_check(*a, **k))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 2, 3, 3, generator=g).to(DEV), torch.randn(2, 48, generator=g).to(DEV))
            for _ in range(2)]
    before = {n: active_positions(t).cpu() for n, t in layers(net).items()}
    assert_gpu_path(sk.select_backend(data[0][0], net.fc1.topology.values).name)
    for x, target in data:
        loss = ((net(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert engine.step()                         # step 2's passes run on step 1's rebuild
        for name, topo in layers(net).items():       # rewired in place, same nnz, valid
            now = active_positions(topo).cpu()
            assert now.numel() == before[name].numel() and not torch.equal(now, before[name]), name
            real_check(topo.shape, topo.block_size, topo.values, *topo.topology())
            before[name] = now
        checks.clear()
        with torch.no_grad():
            y = net(x)                               # the rebuilt structures, through fresh schedules
            y_ref = net.reference(x)
        assert checks == [], "the GPU path re-validated a structure the rebuild marked valid"
        assert ((y.double() - y_ref).abs().max() / y_ref.abs().max()).item() < 1e-4
    assert [h["step"] for h in engine.history] == [1, 2]
    for rec in engine.history:
        for name in ("conv", "fc1", "fc2"):
            assert rec["layers"][name]["grown"] == rec["layers"][name]["pruned"] > 0
