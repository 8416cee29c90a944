"""Does the gate tell an unseen harmful question from an unseen edgy benign one? Its ranking of the two, and a probe's.

The gate fires on some advice questions (medical, legal: benign) and misses most Do-Not-Answer questions; 28's bars
ask for both at once. This scores the unseen suites with the lock's gate on the aligned base (HF, float32) and
reports the AUROC of each harmful suite against the advice questions and against benign instructions — how far
*any* threshold on the gate's score could go — then, as a bound on what the features hold, a logistic probe fit on
the two suites themselves (5-fold, stratified, seeded) at a few layers. Both are Do-Not-Answer's questions split
by intent, but that probe is fit and scored on the same categories, so it may read their topics and phrasing as
much as harm: it bounds the features, it is no gate.

**Fit vs scored**: the gate is fit on the gate's requests only; Do-Not-Answer, ``airt``, past-tense and advice are
in no fit. The in-source probe is fit on folds of Do-Not-Answer and advice and scored on the other folds
(in-distribution by source, said so in the result).

Run: python -m benchmarks.gate_separability [--count 300] [--layers 6,12,16,20] [--lock L --out NAME]
Writes benchmarks/results/NAME.{json,png} (default gate_separability).
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from benchmarks.common import RESULTS, write_result
from benchmarks.responses import product_lock
from safetylock.attack import BASE
from safetylock.evaluate import load_suite
from safetylock.gate import auroc, gate_scores, prompt_features
from safetylock.hf import load_model
from safetylock.lockfile import load
from safetylock.models import resolve

HARMFUL = ("donotanswer", "airt", "past-tense")
BENIGN = ("advice", "benign")


def in_source_auroc(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Mean held-out-fold AUROC of a logistic probe fit on the other folds (5-fold, stratified)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(5, shuffle=True, random_state=seed).split(features, labels)
    values = []
    for fit, held in folds:
        probe = LogisticRegression(C=0.1, max_iter=2000).fit(features[fit], labels[fit])
        scores = probe.decision_function(features[held])
        values.append(auroc(scores[labels[held] == 1], scores[labels[held] == 0]))
    return float(np.mean(values))


@click.command()
@click.option("--count", type=int, default=300, show_default=True, help="Prompts per suite at most.")
@click.option("--layers", default="6,12,16,20", show_default=True, help="Layers of the in-source probe.")
@click.option("--lock", "lock_path", type=click.Path(exists=True, dir_okay=False), help="Another lock (default: extract's).")
@click.option("--out", default="gate_separability", show_default=True)
def main(count: int, layers: str, lock_path: str | None, out: str) -> None:
    lock = load(lock_path or product_lock())
    model, tokenizer = load_model(resolve(BASE))
    prompts = {name: list(load_suite(name, count, 0).asked()) for name in (*HARMFUL, *BENIGN)}
    scores = {name: gate_scores(model, tokenizer, lock.gate, chats) for name, chats in prompts.items()}
    gate = {
        f"{h} vs {b}": round(auroc(scores[h], scores[b]), 3) for h in HARMFUL for b in BENIGN
    }  # 0.5: no threshold separates them
    firing = {name: round(float((s > lock.gate.threshold).mean()), 3) for name, s in scores.items()}
    pair = prompts["donotanswer"] + prompts["advice"]
    labels = np.array([1] * len(prompts["donotanswer"]) + [0] * len(prompts["advice"]))
    wanted = [int(x) for x in layers.split(",")]
    features = prompt_features(model, tokenizer, pair, wanted)
    probe = {str(layer): round(in_source_auroc(features[layer], labels), 3) for layer in wanted}
    result = {
        "protocol": "aligned base, HF float32; the lock's gate (last token + attention read) scored on each suite; "
        "AUROC of harmful against benign suites; an in-source logistic probe on Do-Not-Answer vs advice, 5-fold",
        "lock": lock.fingerprint,
        "gate_layer": lock.gate.layer,
        "sizes": {name: len(p) for name, p in prompts.items()},
        "gate_auroc": gate,
        "gate_firing": firing,
        "in_source_probe_auroc_donotanswer_vs_advice": probe,
        "scores": {name: [round(float(v), 4) for v in s] for name, s in scores.items()},
        "threshold": lock.gate.threshold,
    }
    print(write_result(out, result), plot(result, RESULTS / f"{out}.png"))


def plot(result: dict, path: Path) -> Path:
    """The gate's score distribution per suite, its threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    everything = np.concatenate([np.array(v) for v in result["scores"].values()])
    bins = np.linspace(everything.min(), everything.max(), 40)
    for name, values in result["scores"].items():
        ax.hist(values, bins=bins, histtype="step", density=True, linewidth=1.5, label=f"{name} ({len(values)})")
    ax.axvline(result["threshold"], color="black", linestyle="--", label="threshold")
    ax.set_xlabel("gate score (aligned base)")
    ax.set_ylabel("density")
    ax.set_title("The gate's scores on unseen harmful (Do-Not-Answer, airt, past-tense) and benign suites")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
