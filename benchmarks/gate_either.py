"""Two last-token probes, either firing: the product's probe beside one fit on an added kind of request.

Mixed into the product's data, an added kind of request (``--data people``: requests about a person or a group, with
benign twins) moves the one probe's direction and trades the tense rewrites away (docs/gated.md). Here it gets a probe
of its own instead: probe A is fit on the product's sources (``GATE_DATA["core"]``), probe B on the added sources'
harmful requests against every benign request of the data, and, to compare, one probe on every source (the data
mixed); all at ``--layer`` on the last prompt token (cached features, ``benchmarks.gate_sources``). A and B share one
false-positive budget: A at a given share of the benign calibration requests firing, B then at the lowest threshold
that keeps the two together at or under 5%.

**Fit vs scored**: the unseen sources (``gate_sources.unseen_requests``: ``airt``, HarmBench, Do-Not-Answer, past /
future tense; advice questions benign) are in no fit and set no threshold; thresholds on the data's benign
calibration split (the added kind's benign twins included). Rates only.

Run: python -m benchmarks.gate_either [--data people] [--layer 16] [--out gate_either_people]
Writes benchmarks/results/OUT.{json,png}.
"""

from __future__ import annotations

import click
import numpy as np

from benchmarks.common import RESULTS, write_result
from benchmarks.gate_sources import features_cached, gate_layers, unseen_requests
from safetylock import data, models
from safetylock.gate import fit_linear, threshold_at
from safetylock.sources import GATE_DATA, gate_requests, split

BUDGET = 0.05  # benign calibration requests firing, the two probes together
A_SHARES = (0.02, 0.03, 0.04, 0.05)  # probe A's own share of it


def fired(scores: dict[str, np.ndarray], thresholds: dict[str, float]) -> np.ndarray:
    """Whether any probe's score is over its threshold."""
    return np.any([scores[k] > t for k, t in thresholds.items()], axis=0)


def shared_thresholds(benign: dict[str, np.ndarray], share: float) -> dict[str, float]:
    """A at ``share`` of ``benign`` firing; B at the lowest of its benign scores that keeps A or B within BUDGET."""
    thresholds = {"A": threshold_at(benign["A"], share)}
    for candidate in np.sort(benign["B"])[::-1]:
        if fired(benign, {**thresholds, "B": candidate}).mean() > BUDGET:
            break
        thresholds["B"] = float(candidate)
    thresholds.setdefault("B", float(benign["B"].max()))
    return thresholds


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True)
@click.option("--data", "name", type=click.Choice([n for n in GATE_DATA if n != "core"]), default="people", show_default=True)
@click.option("--layer", type=int, default=16, show_default=True, help="A candidate layer of the gate (cached features).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default=None, help="Result name (default gate_either_DATA).")
def main(model_name: str, name: str, layer: int, seed: int, out: str | None) -> None:
    model_dir = models.resolve(model_name)
    layers = gate_layers(model_dir)
    if layer not in layers:
        raise click.BadParameter(f"{layer} is not a candidate layer ({layers})", param_hint="--layer")
    harmful = data.advbench()
    requests = list(gate_requests(harmful, GATE_DATA[name], seed=seed))
    core = {r.source for r in gate_requests(harmful, GATE_DATA["core"], seed=seed)}
    unseen = unseen_requests(seed)
    everything = requests + [r for asked in unseen.values() for r in asked]
    features = features_cached(model_dir, everything, layers)[layer]
    x = features[: len(requests)]
    labels, sources = np.array([r.harmful for r in requests]), np.array([r.source for r in requests])
    added = ~np.isin(sources, sorted(core))
    fit, calibration = split(requests, seed=seed)
    fit_a, fit_b = fit[~added[fit]], fit[added[fit] | ~labels[fit]]
    probes = {"A": fit_linear(x[fit_a], labels[fit_a], sources[fit_a], seed)}
    probes["B"] = fit_linear(x[fit_b], labels[fit_b], sources[fit_b], seed)
    probes["mixed"] = fit_linear(x[fit], labels[fit], sources[fit], seed)  # one probe on every source, as gate_sources
    score = {k: x @ w + b for k, (w, b) in probes.items()}
    benign_cal = calibration[~labels[calibration]]
    starts = np.cumsum([0, *(len(asked) for asked in unseen.values())])  # each unseen source's first row
    unseen_score = {k: features[len(requests) :] @ w + b for k, (w, b) in probes.items()}

    def rates(thresholds: dict[str, float]) -> dict:
        on_unseen = fired(unseen_score, thresholds)
        on_data = fired(score, thresholds)
        by_kind: dict[str, float] = {}
        for source in sorted(set(sources[calibration].tolist())):
            for harmful in (True, False):
                rows = calibration[(sources[calibration] == source) & (labels[calibration] == harmful)]
                if len(rows):
                    by_kind[f"{source} ({'harmful' if harmful else 'benign'})"] = round(float(on_data[rows].mean()), 4)
        return {
            "thresholds": {k: round(t, 4) for k, t in thresholds.items()},
            "benign_calibration": round(float(on_data[benign_cal].mean()), 4),
            "unseen": {
                n: round(float(on_unseen[s : s + len(asked)].mean()), 4) for (n, asked), s in zip(unseen.items(), starts)
            },
            "calibration": by_kind,
        }

    benign = {k: s[benign_cal] for k, s in score.items()}
    arms = {
        "A alone (the product's sources)": rates({"A": threshold_at(benign["A"], BUDGET)}),
        f"B alone ({name}'s added sources)": rates({"B": threshold_at(benign["B"], BUDGET)}),
        "one probe on every source": rates({"mixed": threshold_at(benign["mixed"], BUDGET)}),
    }
    for share in A_SHARES:
        arms[f"A at {round(100 * share)}% or B"] = rates(shared_thresholds(benign, share))
    for arm, found in arms.items():
        print(arm, found["unseen"], "benign calibration", found["benign_calibration"], flush=True)
    out = out or f"gate_either_{name}"
    write_result(
        out,
        {
            "model": model_name,
            "data": name,
            "added_sources": sorted(set(sources[added].tolist())),
            "layer": layer,
            "read": "last prompt token, float32 features (benchmarks.gate_sources' cache)",
            "protocol": "A fit on the core sources' fit split, B on the added sources' harmful and every benign request "
            "of the fit split; thresholds on the data's benign calibration split sharing a 5% budget; unseen sources "
            "in no fit; rates only",
            "arms": arms,
        },
    )
    plot(arms, RESULTS / f"{out}.png", name)


def plot(arms: dict, path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(arms.values()))["unseen"])
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(arms)
    for k, (arm, found) in enumerate(arms.items()):
        ax.bar(np.arange(len(names)) + k * width, [100 * found["unseen"][n] for n in names], width, label=arm)
    ax.set_xticks(np.arange(len(names)) + width * (len(arms) - 1) / 2, names)
    ax.set_ylabel("fires (%)")
    ax.set_title(f"Either of two last-token probes ({name}): unseen sources at 5% benign calibration together")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
