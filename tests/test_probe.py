import numpy as np
import pytest
import torch

from safetylock.capture import HeadActivations
from safetylock.errors import ExtractError
from safetylock.geometry import HeadGeometry
from safetylock.probe import fit_probes, grouped_split, score_heads, select_heads


def planted(seed: int = 0, questions: int = 40, tokens: int = 3):
    """Noise everywhere except layer 1 head 2, where safe examples sit along a planted direction."""
    geo = HeadGeometry(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64)
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(2 * questions, tokens, 3, 4, 16, generator=gen)
    direction = torch.randn(16, generator=gen)
    direction /= direction.norm()
    labels = torch.tensor([1, 0] * questions)
    values[:, :, 1, 2] += 5.0 * (labels.float()[:, None, None] - 0.5) * direction
    groups = torch.arange(questions).repeat_interleave(2)
    return HeadActivations(values, labels, groups, geo, tokens), direction


def test_planted_direction_is_recovered_and_ranked_first():
    acts, direction = planted()
    result = fit_probes(acts, top_k=1, seed=0, progress=False)
    assert (result.layers[0], result.heads[0]) == (1, 2)
    assert result.accuracy[1, 2] > 0.95
    assert np.median(result.accuracy) < 0.75
    cosine = float(np.dot(result.directions[0], direction.numpy()))
    assert cosine > 0.9  # oriented toward safe, not merely parallel
    assert abs(np.linalg.norm(result.directions[0]) - 1) < 1e-5
    assert result.sigmas[0] > 0


def test_split_never_puts_one_question_on_both_sides():
    groups = np.repeat(np.arange(50), 2)
    for seed in range(5):
        split = grouped_split(groups, 0.2, seed)
        assert not set(groups[split.train]) & set(groups[split.validation])
        assert len(split.train) + len(split.validation) == 100


def test_probe_split_is_seeded():
    groups = np.repeat(np.arange(50), 2)
    assert np.array_equal(grouped_split(groups, 0.2, 3).validation, grouped_split(groups, 0.2, 3).validation)
    assert not np.array_equal(grouped_split(groups, 0.2, 3).validation, grouped_split(groups, 0.2, 4).validation)


def test_one_scoring_serves_every_k():
    acts, _ = planted(seed=1)
    scores = score_heads(acts, seed=0, progress=False)
    previous: set[tuple[int, int]] = set()
    for k in (1, 3, 12):
        alone, shared = fit_probes(acts, top_k=k, seed=0, progress=False), select_heads(acts, scores, k)
        assert np.array_equal(alone.layers, shared.layers) and np.array_equal(alone.heads, shared.heads)
        assert np.array_equal(alone.directions, shared.directions) and np.array_equal(alone.sigmas, shared.sigmas)
        chosen = set(zip(shared.layers.tolist(), shared.heads.tolist()))
        assert len(chosen) == k and previous <= chosen  # a larger K keeps the smaller K's heads
        previous = chosen


def test_top_k_out_of_range_is_refused_before_fitting():
    acts, _ = planted()
    for bad in (0, 13):
        with pytest.raises(ExtractError, match="top_k must be in 1..12"):
            fit_probes(acts, top_k=bad, progress=False)
