"""The DST benchmark's step timer: every contender trains on every batch, in order, taking
turns in blocks of consecutive steps (block=1 is a strict round robin)."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_dst_cpu  # noqa: E402


class Recorder(nn.Module):
    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        self.log.append((self.name, int(x[0, 0])))
        return self.lin(x)


class CountingEngine:
    def __init__(self):
        self.step_count = 0

    def step(self):
        self.step_count += 1


@pytest.mark.parametrize("block", [1, 2, 4, 10])
def test_blocks_of_turns_cover_every_batch_in_order(block):
    log = []
    data = [(torch.full((2, 3), float(i)), torch.tensor([0, 1])) for i in range(7)]
    contenders = {}
    for name in ("a", "b"):
        m = Recorder(name, log)
        contenders[name] = (m, torch.optim.SGD(m.parameters(), lr=0.1), CountingEngine())
    per_step = bench_dst_cpu.time_training(contenders, data, block, warmup=1)
    assert set(per_step) == {"a", "b"} and all(t > 0 for t in per_step.values())
    for name in ("a", "b"):
        assert [i for n, i in log if n == name] == list(range(7))
        assert contenders[name][2].step_count == 7
    expected = [(n, i) for s in range(0, 7, block) for n in ("a", "b") for i in range(s, min(s + block, 7))]
    assert log == expected
