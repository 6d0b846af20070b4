import pytest
import torch

from quantcore.errors import ConfigError
from quantcore.methods import (
    cond_mask,
    dgc_mahalanobis,
    dgc_official,
    expected_pinv_distance,
    mahalanobis_pinv,
    select_calibration,
)

N, D = 32, 64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pool(uncond: str, seed: int = 0) -> torch.Tensor:
    """[N cond, N uncond] feature rows; the uncond half diverse, collapsed, or collapsed + tiny noise."""
    g = _gen(seed)
    cond = torch.randn(N, D, generator=g)
    if uncond == "diverse":
        return torch.cat([cond, torch.randn(N, D, generator=g)])
    point = torch.randn(1, D, generator=g).expand(N, D)
    noise = 1e-4 * torch.randn(N, D, generator=g) if uncond == "noisy" else 0.0
    return torch.cat([cond, point + noise])


def _interleave(pool: torch.Tensor, b: int) -> torch.Tensor:
    cond, uncond = pool[:N].split(b), pool[N:].split(b)
    return torch.cat([t for pair in zip(cond, uncond, strict=True) for t in pair])


def test_pinv_distances_are_constant_when_n_is_below_d():
    d = mahalanobis_pinv(torch.randn(N, D, generator=_gen(1)))
    assert torch.allclose(d, torch.full((N,), expected_pinv_distance(N)), atol=1e-3)


def test_official_gives_half_and_half_when_both_halves_are_diverse():
    idx, info = dgc_official(_pool("diverse"))
    assert info["pct"] == 0.5 and info["distances_allclose"]
    assert torch.equal(idx, torch.cat([torch.arange(N // 2), torch.arange(N, N + N // 2)]))
    assert info["counts"] == {"cond": N // 2, "uncond": N // 2}


def test_official_picks_only_cond_when_uncond_is_identical():
    idx, info = dgc_official(_pool("collapsed"))
    assert info["pct"] == 1.0
    assert torch.equal(idx, torch.arange(N))
    assert info["dist_uncond"]["max"] < info["dist_cond"]["min"]


def test_official_is_fragile_to_tiny_noise_on_the_collapsed_half():
    # pinv's relative cut-off sees near-identical noisy rows as full rank: back to 50/50 (ref section 7).
    _, info = dgc_official(_pool("noisy"))
    assert info["pct"] == 0.5


def test_official_per_generation_batch_keeps_the_first_rows_of_each_batch():
    b = 8
    pool = _interleave(_pool("collapsed"), b)
    assert torch.equal(cond_mask(2 * N, b)[: 2 * b], torch.tensor([True] * b + [False] * b))
    idx, info = dgc_official(pool, batch_size=b)
    assert info["pct"] == 1.0 and info["batch_size"] == b
    assert torch.equal(idx, torch.cat([torch.arange(2 * i * b, (2 * i + 1) * b) for i in range(N // b)]))
    idx, info = dgc_official(_interleave(_pool("diverse"), b), batch_size=b)
    assert info["counts"] == {"cond": N // 2, "uncond": N // 2}
    assert idx[:6].tolist() == [0, 1, 2, 3, 8, 9]


def test_mahalanobis_ranks_individual_samples_and_is_deterministic():
    pool = _pool("noisy")
    idx, info = dgc_mahalanobis(pool)
    assert idx.numel() == N and torch.equal(idx, idx.sort().values)
    assert info["counts"]["cond"] >= N - 2  # the collapsed uncond cluster is redundant
    assert 1 <= info["pca"]["dim"] <= min(D, N // 4, 32)
    again, again_info = dgc_mahalanobis(pool.clone())
    assert torch.equal(idx, again) and info == again_info
    # It keeps individual outlying samples, not the first ones of a group.
    diverse = _pool("diverse")
    diverse[5] *= 10
    diverse[N + 7] *= 10
    idx, _ = dgc_mahalanobis(diverse, k=4)
    assert {5, N + 7} <= set(idx.tolist())


def test_random_and_uniform():
    idx, info = select_calibration("random", num_pool=2 * N, seed=3)
    again, _ = select_calibration("random", num_pool=2 * N, seed=3)
    other, _ = select_calibration("random", num_pool=2 * N, seed=4)
    assert torch.equal(idx, again) and not torch.equal(idx, other)
    assert idx.numel() == N and idx.unique().numel() == N
    assert info["counts"]["cond"] + info["counts"]["uncond"] == N
    idx, info = select_calibration("uniform", num_pool=2 * N)
    assert torch.equal(idx, torch.arange(0, 2 * N, 2))
    assert info["counts"] == {"cond": N // 2, "uncond": N // 2}
    idx, info = select_calibration("uniform", num_pool=2 * N, batch_size=8)
    assert info["counts"] == {"cond": N // 2, "uncond": N // 2}


def test_dispatch_errors():
    with pytest.raises(ConfigError, match="feature vectors"):
        select_calibration("dgc-official", num_pool=8)
    with pytest.raises(ConfigError, match="unknown"):
        select_calibration("entropy", num_pool=8)
    with pytest.raises(ConfigError, match="batches"):
        cond_mask(24, 5)
    with pytest.raises(ConfigError, match="half"):
        select_calibration("dgc-official", features=_pool("diverse"), k=3)


@pytest.mark.parametrize("uncond", ["diverse", "collapsed"])
def test_official_within_generation_batches_of_a_halves_pool_equals_the_interleaved_pool(uncond):
    # VAR/PAR generate 32 images a batch and select within each; our pool is [cond N | uncond N]
    b, pool = 8, _pool(uncond)
    halves, info = dgc_official(pool, generation_batch=b)
    interleaved, _ = dgc_official(_interleave(pool, b), batch_size=b)
    row = torch.arange(2 * N)
    to_halves = torch.where(
        (row // b) % 2 == 0, (row // (2 * b)) * b + row % b, N + (row // (2 * b)) * b + row % b
    )
    assert sorted(halves.tolist()) == sorted(to_halves[interleaved].tolist())
    assert info["batch_size"] == b and info["counts"]["cond"] + info["counts"]["uncond"] == N
    if uncond == "diverse":  # pct 0.5: the first half of every batch, both halves of the pool
        assert halves[:4].tolist() == [0, 1, 2, 3] and halves[4:8].tolist() == [N, N + 1, N + 2, N + 3]
    same, _ = select_calibration("dgc-official", features=pool, generation_batch=b)
    assert torch.equal(same, halves)
