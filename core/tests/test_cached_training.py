import pytest
import torch
from torch import nn

from selfflow.core.cached_training import cache_file, cached_classifier


def _batches(indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(indices.start)
    y = torch.arange(len(indices)) % 2
    return torch.randn(len(indices), 4, generator=g) + 2 * y[:, None], y


def test_cache_file_lives_in_selfflow_cache_and_depends_on_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path))
    a, b = cache_file("probe", "v1-0"), cache_file("probe", "v1-1")
    assert a.parent == tmp_path and a.name.startswith("probe_") and a.suffix == ".pt"
    assert a != b and a == cache_file("probe", "v1-0")


def _logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x)


def test_trains_once_then_loads_the_same_weights(tmp_path):
    path = tmp_path / "net.pt"
    torch.manual_seed(0)
    before = nn.Linear(4, 2).weight.detach().clone()  # the initialisation seed 0 gives
    net = cached_classifier(lambda: nn.Linear(4, 2), path, _logits, _batches, steps=20, batch=16, seed=0)
    assert not net.training and path.is_file()
    assert not torch.equal(before, net.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]  # no temporary file left behind

    def no_training(indices: range):
        raise AssertionError("a cached network must not train again")

    again = cached_classifier(lambda: nn.Linear(4, 2), path, _logits, no_training, steps=20, batch=16, seed=0)
    assert torch.equal(again.weight, net.weight)


def test_weights_depend_on_the_seed_not_on_the_caller_s_random_state(tmp_path):
    def train(name: str, seed: int) -> torch.Tensor:
        return cached_classifier(lambda: nn.Linear(4, 2), tmp_path / name, _logits, _batches, 3, 8, seed).weight

    torch.manual_seed(1)
    a = train("a.pt", 0)
    state = torch.random.get_rng_state()
    b = train("b.pt", 0)  # another caller state (the RNG moved on since seeding)
    assert torch.equal(a, b) and not torch.equal(a, train("c.pt", 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's stream is left as it was


def test_a_failed_training_leaves_no_file(tmp_path):
    def broken(indices: range):
        raise RuntimeError("data went away")

    with pytest.raises(RuntimeError):
        cached_classifier(lambda: nn.Linear(4, 2), tmp_path / "n.pt", _logits, broken, steps=1, batch=1, seed=0)
    assert not any(tmp_path.iterdir())


def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))


def _image_batches(indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(indices.start)
    return torch.randn(len(indices), 3, 16, 16, generator=g), torch.arange(len(indices)) % 2


def test_the_weights_do_not_depend_on_the_callers_thread_count(tmp_path):
    """A cached net is trained by whichever run needs it first: trained on the caller's threads, the shapes probe
    differed by up to 0.14 between 1 and 2 threads, and every metric read through it with it. It trains on
    TRAINING_THREADS now, and the caller's setting is restored."""
    threads = torch.get_num_threads()
    weights = []
    try:
        for n, caller in enumerate((1, 3)):
            torch.set_num_threads(caller)
            net = cached_classifier(_conv_net, tmp_path / f"{n}.pt", _logits, _image_batches, steps=5, batch=64,
                                    seed=0)
            assert torch.get_num_threads() == caller
            weights.append(net.state_dict())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_cache_key_names_the_torch_version(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path))
    now = cache_file("probe", "v1-0")
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert cache_file("probe", "v1-0") != now
