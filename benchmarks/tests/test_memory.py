import torch

from benchmarks.memory import live_peak_bytes


def test_live_peak_counts_the_tensors_held_at_once_not_all_allocated():
    def step():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB, with a: the peak
        del a
        c = torch.empty(500_000)  # 2 MB, after a is freed
        return b.sum() + c.sum()

    assert live_peak_bytes(step) == 12_000_000  # a and b; c and the sums come after a is freed
