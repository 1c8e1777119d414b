"""The runtime: free cores from the CPU counters, threads set once and rebalanced, the config key."""

import pytest
import torch

from metatl.config import ConfigError, from_dict
from metatl.engine import runtime


class FakeMachine:
    """CPU counters of a machine with ``cores`` cores, advanced by hand."""

    def __init__(self, monkeypatch, cores=4):
        self.cores, self.busy, self.total, self.own = cores, 0.0, 0.0, 0.0
        monkeypatch.setattr(runtime, "_cpu_counters", lambda: (self.busy, self.total))
        monkeypatch.setattr(runtime, "_own_cpu", lambda: self.own)
        monkeypatch.setattr(runtime, "available_cores", lambda: cores)
        monkeypatch.setattr(runtime.os, "cpu_count", lambda: cores)

    def run(self, seconds, others, own=0.0):
        """``seconds`` of wall time with ``others`` cores busy elsewhere and ``own`` cores in use here."""
        self.total += seconds * self.cores
        self.busy += seconds * min(self.cores, others + own)
        self.own += seconds * own


@pytest.mark.parametrize("others, own, free", [(0, 0, 4), (1, 0, 3), (1, 3, 3), (2.6, 1, 1), (4, 0, 1), (0, 4, 4)])
def test_free_cores_subtracts_the_other_processes(monkeypatch, others, own, free):
    machine = FakeMachine(monkeypatch)
    since = runtime.LoadSample()
    machine.run(2.0, others, own)
    assert runtime.free_cores(since) == free


def test_auto_threads_follow_the_load_when_rebalanced(monkeypatch):
    machine = FakeMachine(monkeypatch)
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime.time, "sleep", lambda s: machine.run(s, others=1))
    try:
        rt = runtime.Runtime("auto")
        assert rt.threads == torch.get_num_threads() == 3
        machine.run(5.0, others=3, own=1)
        assert rt.rebalance(every=0) == torch.get_num_threads() == 1
        machine.run(5.0, others=0, own=1)
        assert rt.rebalance(every=3600) == 1  # not yet due
        assert rt.rebalance(every=0) == 4
        assert runtime.Runtime("auto", world=2).threads == 1  # 3 free cores shared by 2 processes
        fixed = runtime.Runtime(2)
        machine.run(5.0, others=4)
        assert fixed.rebalance(every=0) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_runtime_sets_the_seed():
    runtime.Runtime(torch.get_num_threads(), seed=3)
    a = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("value, ok", [("auto", True), (None, True), (2, True), (0, False), ("many", False)])
def test_num_threads_setting(value, ok):
    raw = {"train": {"num_threads": value}}
    if ok:
        assert from_dict(raw).train.num_threads == value
    else:
        with pytest.raises(ConfigError, match="num_threads"):
            from_dict(raw)
