"""Stage 2 — probe: one logistic probe per (layer, head), top-K heads, their safe directions and σ."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import GroupShuffleSplit
from tqdm import tqdm

from safetylock.capture import HeadActivations
from safetylock.errors import ExtractError
from safetylock.geometry import HeadGeometry
from safetylock.threads import one_thread_fits


@dataclass(frozen=True)
class GroupedSplit:
    """Example indices of the probe train / validation parts; no question is on both sides."""

    train: np.ndarray
    validation: np.ndarray


def grouped_split(groups: np.ndarray, validation_fraction: float, seed: int) -> GroupedSplit:
    splitter = GroupShuffleSplit(n_splits=1, test_size=validation_fraction, random_state=seed)
    train, validation = next(splitter.split(np.zeros(len(groups)), groups=groups))
    return GroupedSplit(np.sort(train), np.sort(validation))


@dataclass(frozen=True)
class HeadScores:
    """Validation accuracy and log-loss of every head's probe (``[layers, heads]``) and the split they used."""

    accuracy: np.ndarray
    loss: np.ndarray
    split: GroupedSplit


@dataclass
class ProbeResult:
    """Per-head probe scores (``[layers, heads]``) and the chosen heads with direction and σ."""

    accuracy: np.ndarray
    loss: np.ndarray
    layers: np.ndarray  # [K]
    heads: np.ndarray  # [K]
    directions: np.ndarray  # [K, head_dim], unit, oriented toward safe
    sigmas: np.ndarray  # [K]
    split: GroupedSplit


def safe_direction(train_x: np.ndarray, train_y: np.ndarray) -> tuple[np.ndarray, float]:
    """Unit mass-mean shift (mean safe − mean unsafe) and the std of projections onto it."""
    shift = train_x[train_y == 1].mean(0) - train_x[train_y == 0].mean(0)
    norm = float(np.linalg.norm(shift))
    if not np.isfinite(norm) or norm == 0.0:
        raise ExtractError("safe and unsafe activations have the same mean; no direction to lock")
    direction = shift / norm
    return direction, float((train_x @ direction).std())


def check_top_k(geometry: HeadGeometry, top_k: int) -> None:
    """ExtractError unless ``top_k`` heads can be chosen from this geometry."""
    heads = geometry.num_layers * geometry.num_heads
    if not 0 < top_k <= heads:
        raise ExtractError(f"top_k must be in 1..{heads} (the model has {heads} heads), got {top_k}")


def _labels_per_token(acts: HeadActivations, examples: np.ndarray) -> np.ndarray:
    return np.repeat(acts.labels.numpy()[examples], acts.tokens)


def _head_samples(acts: HeadActivations, examples: np.ndarray, layer: int, head: int) -> np.ndarray:
    """``[examples × tokens, head_dim]`` activations of one head, in float64."""
    rows = acts.values[torch.from_numpy(examples), :, layer, head]
    return rows.reshape(-1, acts.geometry.head_dim).to(torch.float64).numpy()


def score_heads(acts: HeadActivations, validation_fraction: float = 0.2, seed: int = 0, progress: bool = True) -> HeadScores:
    """Fit one logistic probe per (layer, head) on the train part; score it on the held-out questions."""
    geo = acts.geometry
    split = grouped_split(acts.groups.numpy(), validation_fraction, seed)
    y_train, y_val = _labels_per_token(acts, split.train), _labels_per_token(acts, split.validation)
    if len(set(y_train)) < 2 or len(set(y_val)) < 2:
        raise ExtractError("both safe and unsafe examples are needed on each side of the probe split")
    accuracy = np.zeros((geo.num_layers, geo.num_heads))
    loss = np.zeros((geo.num_layers, geo.num_heads))
    heads = [(layer, head) for layer in range(geo.num_layers) for head in range(geo.num_heads)]
    with warnings.catch_warnings(), one_thread_fits():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for layer, head in tqdm(heads, desc="probes", unit="head", disable=not progress):
            x_val = _head_samples(acts, split.validation, layer, head)
            probe = LogisticRegression(max_iter=500, random_state=seed)
            probe.fit(_head_samples(acts, split.train, layer, head), y_train)
            accuracy[layer, head] = probe.score(x_val, y_val)
            loss[layer, head] = log_loss(y_val, probe.predict_proba(x_val), labels=[0, 1])
    return HeadScores(accuracy, loss, split)


def select_heads(acts: HeadActivations, scores: HeadScores, top_k: int) -> ProbeResult:
    """Keep the ``top_k`` heads by validation accuracy (ties: lower log-loss); direction and σ from the train part."""
    check_top_k(acts.geometry, top_k)
    heads = list(np.ndindex(scores.accuracy.shape))
    chosen = sorted(sorted(heads, key=lambda lh: (-scores.accuracy[lh], scores.loss[lh], lh))[:top_k])
    y_train = _labels_per_token(acts, scores.split.train)
    directions, sigmas = [], []
    for layer, head in chosen:
        direction, sigma = safe_direction(_head_samples(acts, scores.split.train, layer, head), y_train)
        directions.append(direction)
        sigmas.append(sigma)
    return ProbeResult(
        accuracy=scores.accuracy,
        loss=scores.loss,
        layers=np.array([lh[0] for lh in chosen], dtype=np.int64),
        heads=np.array([lh[1] for lh in chosen], dtype=np.int64),
        directions=np.stack(directions).astype(np.float32),
        sigmas=np.array(sigmas, dtype=np.float32),
        split=scores.split,
    )


def fit_probes(
    acts: HeadActivations,
    top_k: int = 24,
    validation_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> ProbeResult:
    """Score every head's probe, then keep the ``top_k`` best (see :func:`score_heads`, :func:`select_heads`)."""
    check_top_k(acts.geometry, top_k)  # before the minutes of fitting, not after
    return select_heads(acts, score_heads(acts, validation_fraction, seed, progress), top_k)
