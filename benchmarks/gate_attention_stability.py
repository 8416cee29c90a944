"""How stable is the attention-read gate's fit, and does the precision of its features matter?

The attention probe (300 full-batch Adam steps, L2 0.01) is a non-convex, early-stopped fit. This benchmark fits the
product's attention-read gate (``gate.fit_read``: last-token probe and attention probe averaged) at layer 16 of the
default model on the gate's requests several ways and scores each on the packaged sources no gate is fit on
(``gate_sources.unseen_requests``; float32 token features, as vLLM serves here), thresholds at 5% of the gate's
benign calibration requests through the same features it was fit on:

* ``single``: one fit — from zero on float32 features, on bfloat16 features (the feature forward ``extract`` runs
  on an AVX-512/AMX CPU), and on float32 features jittered by 1% (seeded); from a seeded random start
  (``gate.POOL_START``) on float32 features;
* ``mean of N``: the mean of ``N`` fits from seeded random starts, run side by side (``gate.fit_attention``; the
  product's fit has ``gate.POOL_DRAWS``), from two seeds on float32 features and one on bfloat16 features.

Reported per arm: firing on each unseen source (advice questions benign), on the benign calibration requests, the
fit's seconds, and the cosine of the attention probe's vectors ``u`` and ``q`` to those of the first arm of its
kind. What chose the product's fit is the agreement between arms (cosines) and the time, which read no unseen
source; the unseen rates are reported, not tuned on. (``results/gate_attention_stability_jitter.*``: the earlier
product's mean of four fits on 1%-jittered rows, run one after another, measured by this benchmark's version of
commit ddac7b4.)

Run: python -m benchmarks.gate_attention_stability [--out NAME]
Writes benchmarks/results/NAME.{json,png} (rates only; default NAME gate_attention_stability).
"""

from __future__ import annotations

import time

import click
import numpy as np

from benchmarks.common import RESULTS, write_result
from benchmarks.gate_pooling import token_features
from benchmarks.gate_sources import unseen_requests
from safetylock import data, models
from safetylock.gate import (
    POOL_DRAWS,
    POOL_START,
    TARGET_FPR,
    fit_read,
    prompt_tokens,
    read_scores,
    system_turn,
    threshold_at,
)
from safetylock.hf import load_model
from safetylock.sources import Sizes, gate_requests, split

LAYER = 16  # the product gate's layer on the default model


JITTER = 0.01  # relative, Gaussian: about what bfloat16's rounding moves the features


def jittered(tokens: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """``tokens`` each times ``1 + JITTER·noise`` (seeded)."""
    noise = np.random.default_rng(seed)
    return [(t * (1 + JITTER * noise.standard_normal(t.shape))).astype(np.float32) for t in tokens]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))), 3)


def plot(arms: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, arm in arms.items():
        harmful = [v for k, v in arm["unseen"].items() if k != "advice"]
        ax.scatter(100 * arm["unseen"]["advice"], 100 * np.mean(harmful), marker="o" if "mean" in name else "x")
        ax.annotate(name, (100 * arm["unseen"]["advice"], 100 * np.mean(harmful)), fontsize=7)
    ax.set_xlabel("advice questions firing (%, benign, unseen)")
    ax.set_ylabel("mean firing on unseen harmful sources (%)")
    ax.set_title("Attention-read gate: one fit vs the mean of fits from random starts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default="gate_attention_stability", show_default=True)
def main(model_name: str, seed: int, out: str) -> None:
    started = time.perf_counter()
    model_dir = models.resolve(model_name)
    requests = list(gate_requests(data.advbench(), Sizes(), seed=seed))
    unseen = unseen_requests(seed)
    everything = requests + [r for asked in unseen.values() for r in asked]
    found = token_features(model_dir, everything, (LAYER,))[LAYER]  # float32 forward, cached
    rows = [found.rows[found.offsets[i] : found.offsets[i + 1]] for i in range(len(everything))]
    float32, unseen_rows, start = rows[: len(requests)], {}, len(requests)
    for name, asked in unseen.items():
        unseen_rows[name], start = rows[start : start + len(asked)], start + len(asked)
    model, tokenizer = load_model(model_dir)
    chats = [r.messages() for r in requests]
    bfloat16 = prompt_tokens(model, tokenizer, chats, LAYER, system_turn(tokenizer), progress=True, precision="bfloat16")
    if [len(t) for t in bfloat16] != [len(t) for t in float32]:
        raise SystemExit("the bfloat16 forward read other positions than the cached float32 features")
    fit, calibration = split(requests, seed=seed)
    benign_cal = calibration[~np.array([r.harmful for r in requests])[calibration]]
    plans = [
        ("single, float32", float32, 1, 0.0, seed),
        ("single, bfloat16", bfloat16, 1, 0.0, seed),
        *((f"single, float32 jittered ({d})", jittered(float32, d + 1), 1, 0.0, seed) for d in range(3)),
        *((f"single, float32 random start ({d})", float32, 1, POOL_START, d + 1) for d in range(3)),
        ("mean of 4, float32 (seed 1)", float32, 4, POOL_START, 1),
        ("mean of 4, float32 (seed 2)", float32, 4, POOL_START, 2),
        (f"mean of {POOL_DRAWS}, float32 (seed 1)", float32, POOL_DRAWS, POOL_START, 1),
        (f"mean of {POOL_DRAWS}, float32 (seed 2)", float32, POOL_DRAWS, POOL_START, 2),
        (f"mean of {POOL_DRAWS}, bfloat16 (seed 3)", bfloat16, POOL_DRAWS, POOL_START, 3),
    ]
    arms, vectors = {}, {}
    for name, tokens, draws, start, draw_seed in plans:
        began = time.perf_counter()
        weight, bias, pooled = fit_read(tokens, requests, fit, draw_seed, "attention", draws, start)
        took = round(time.perf_counter() - began, 1)
        threshold = threshold_at(read_scores([tokens[i] for i in benign_cal], weight, bias, pooled), TARGET_FPR)
        fires = {u: round(float((read_scores(z, weight, bias, pooled) > threshold).mean()), 4) for u, z in unseen_rows.items()}
        kind = f"mean of {draws}" if draws > 1 else "single"
        first = vectors.setdefault(kind, pooled)
        arms[name] = {
            "draws": draws,
            "start": start,
            "seed": draw_seed,
            "fit_seconds": took,
            "unseen": fires,
            "benign_calibration_float32": round(
                float((read_scores([float32[i] for i in benign_cal], weight, bias, pooled) > threshold).mean()), 4
            ),
            "cosine_to_first_of_kind": {"u": cosine(pooled[0], first[0]), "q": cosine(pooled[1], first[1])},
        }
        print(name, arms[name], flush=True)
    write_result(
        out,
        {
            "model": model_name,
            "layer": LAYER,
            "requests": len(requests),
            "protocol": "fit on the gate's fit split, threshold at 5% of its benign calibration requests (features "
            "the arm was fit on); unseen sources scored on float32 features; rates only",
            "arms": arms,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    plot(arms, RESULTS / f"{out}.png")


if __name__ == "__main__":
    main()
