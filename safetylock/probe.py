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


@dataclass(frozen=True)
class GroupedSplit:
    """Example indices of the probe train / validation parts; no question is on both sides."""

    train: np.ndarray
    validation: np.ndarray


def grouped_split(groups: np.ndarray, validation_fraction: float, seed: int) -> GroupedSplit:
    splitter = GroupShuffleSplit(n_splits=1, test_size=validation_fraction, random_state=seed)
    train, validation = next(splitter.split(np.zeros(len(groups)), groups=groups))
    return GroupedSplit(np.sort(train), np.sort(validation))


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
        raise ValueError("safe and unsafe activations have the same mean; no direction to lock")
    direction = shift / norm
    return direction, float((train_x @ direction).std())


def fit_probes(
    acts: HeadActivations,
    top_k: int = 24,
    validation_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> ProbeResult:
    """Fit and rank all probes; keep the ``top_k`` heads by validation accuracy (ties: lower log-loss)."""
    geo = acts.geometry
    if not 0 < top_k <= geo.num_layers * geo.num_heads:
        raise ValueError(f"top_k must be in 1..{geo.num_layers * geo.num_heads}, got {top_k}")
    labels = acts.labels.numpy()
    groups = acts.groups.numpy()
    split = grouped_split(groups, validation_fraction, seed)
    tokens = acts.tokens
    y_train = np.repeat(labels[split.train], tokens)
    y_val = np.repeat(labels[split.validation], tokens)
    if len(set(y_train)) < 2 or len(set(y_val)) < 2:
        raise ValueError("both safe and unsafe examples are needed on each side of the probe split")
    values = acts.values.to(torch.float64).numpy()
    accuracy = np.zeros((geo.num_layers, geo.num_heads))
    loss = np.zeros((geo.num_layers, geo.num_heads))
    heads = [(layer, head) for layer in range(geo.num_layers) for head in range(geo.num_heads)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for layer, head in tqdm(heads, desc="probes", unit="head", disable=not progress):
            x_train = values[split.train, :, layer, head].reshape(-1, geo.head_dim)
            x_val = values[split.validation, :, layer, head].reshape(-1, geo.head_dim)
            probe = LogisticRegression(max_iter=500, random_state=seed).fit(x_train, y_train)
            accuracy[layer, head] = probe.score(x_val, y_val)
            loss[layer, head] = log_loss(y_val, probe.predict_proba(x_val), labels=[0, 1])
    order = sorted(heads, key=lambda lh: (-accuracy[lh], loss[lh], lh))[:top_k]
    order.sort()
    directions, sigmas = [], []
    for layer, head in order:
        x_train = values[split.train, :, layer, head].reshape(-1, geo.head_dim)
        direction, sigma = safe_direction(x_train, y_train)
        directions.append(direction)
        sigmas.append(sigma)
    return ProbeResult(
        accuracy=accuracy,
        loss=loss,
        layers=np.array([lh[0] for lh in order], dtype=np.int64),
        heads=np.array([lh[1] for lh in order], dtype=np.int64),
        directions=np.stack(directions).astype(np.float32),
        sigmas=np.array(sigmas, dtype=np.float32),
        split=split,
    )
