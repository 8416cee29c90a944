"""The gate-data options against the product's data, each as the mean of several whole seeds, by a rule fixed in
advance.

Reads ``gate_seed_noise``'s results: the core's (``results/gate_seed_noise.json``) and each option's
(``results/gate_seed_noise_NAME.json``, from ``python -m benchmarks.gate_seed_noise --fit-seeds 0 --whole-seeds 5
--gate-data NAME --out gate_seed_noise_NAME``; ``crossfit``: the core's data fit another way, ``--fit-protocol
crossfit``), the ``whole`` way of each (data and fit seed varied together). A
scored source whose prompts are in the option's data is not held out for that option; the core's figures are
recomputed on the same held-out sources from its per-seed firing, so both sides of a comparison are scored alike.

The band of a difference between two means is ``2·sd·√(1/n_core + 1/n_option)`` with the core's sd (1.26·sd for
five seeds each). An option is a candidate for re-serving only if, on its held-out sources: mean F1 (equal
prevalence) rises by at least the band; no harmful source's mean falls by more than its band; no benign source's
mean rises by more than its band; mean FPR rises by no more than its band. Nothing here changes what is served.

Also, not part of the rule: each file's mean card at every threshold of its fits' ``curve`` (1–12% of the benign
requests the threshold is set on), where every scored source is held out — whether an option moves the curve or only
its operating point.

Run: python -m benchmarks.gate_options [--options harm_evals,people,asks,topics,pairs,crossfit]
Writes benchmarks/results/gate_options.{json,png} and gate_options_curves.png (rates only); an option without its
result file is skipped.
"""

from __future__ import annotations

import json
import math

import click
import numpy as np

from benchmarks.common import RESULTS, write_result
from benchmarks.gate_guard import card

CORE = "gate_seed_noise"
CARD_KEYS = ("mean_tpr", "mean_fpr", "f1_equal_prevalence")


def whole_runs(result: dict) -> list[dict]:
    return result["ways"]["whole"]["runs"]


def held_out(result: dict) -> dict[str, bool]:
    """The option's held-out sources (name → harmful): the scored sources not marked as in its gate data."""
    return {n: s["harmful"] for n, s in result["sources"].items() if not s.get("in_gate_data", False)}


def per_seed(runs: list[dict], harmful: dict[str, bool]) -> dict[str, list[float]]:
    """Each held-out source's firing and the card's figures, one value per seed."""
    cards = [card(run["firing"], harmful) for run in runs]
    return {
        **{name: [run["firing"][name] for run in runs] for name in harmful},
        **{key: [c[key] for c in cards] for key in CARD_KEYS},
    }


def compare(core: dict, option: dict) -> dict:
    """The option's means against the core's on the option's held-out sources, each clause of the rule checked."""
    harmful = held_out(option)
    base, other = per_seed(whole_runs(core), harmful), per_seed(whole_runs(option), harmful)
    n_core, n_option = len(whole_runs(core)), len(whole_runs(option))
    rows = {}
    for name in base:
        sd = float(np.std(base[name], ddof=1))
        rows[name] = {
            "core_mean": round(float(np.mean(base[name])), 4),
            "option_mean": round(float(np.mean(other[name])), 4),
            "change": round(float(np.mean(other[name]) - np.mean(base[name])), 4),
            "band": round(2 * sd * math.sqrt(1 / n_core + 1 / n_option), 4),
        }
    f1, fpr = rows["f1_equal_prevalence"], rows["mean_fpr"]
    clauses = {
        "f1_up_by_band": f1["change"] >= f1["band"],
        "no_harmful_source_down_past_band": all(rows[n]["change"] >= -rows[n]["band"] for n, bad in harmful.items() if bad),
        "no_benign_source_up_past_band": all(rows[n]["change"] <= rows[n]["band"] for n, bad in harmful.items() if not bad),
        "mean_fpr_up_within_band": fpr["change"] <= fpr["band"],
    }
    not_held = [n for n in option["sources"] if n not in harmful]
    return {
        "gate_data": option["gate_data"],
        "fit_protocol": option.get("fit_protocol", "split"),
        "seeds": {"core": n_core, "option": n_option},
        "layers": option["ways"]["whole"]["layers"],
        "held_out": harmful,
        "in_gate_data": not_held,
        "rows": rows,
        "clauses": clauses,
        "candidate": all(clauses.values()),
    }


def curve(result: dict) -> dict[str, dict[str, float]] | None:
    """Mean TPR and mean FPR over the whole seeds at each threshold of the fits' ``curve`` (None where the file
    has none, or where a scored source is in the gate's data: its card is over other sources than the core's)."""
    runs = whole_runs(result)
    if "curve" not in runs[0] or held_out(result).keys() != result["sources"].keys():
        return None
    return {
        target: {key: round(float(np.mean([run["curve"][target][key] for run in runs])), 4) for key in CARD_KEYS}
        for target in runs[0]["curve"]
    }


def plot_curves(curves: dict[str, dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, points in curves.items():
        fprs, tprs = zip(*((100 * p["mean_fpr"], 100 * p["mean_tpr"]) for p in points.values()))
        ax.plot(fprs, tprs, marker="o", label=name, linewidth=2.5 if name == "core" else 1.2)
    ax.set_xlabel("mean FPR on the scored benign sources (%)")
    ax.set_ylabel("mean TPR on the scored harmful sources (%)")
    ax.set_title("Means of five seeds, threshold at 1-12% of each fit's benign requests", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(comparisons: dict[str, dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(comparisons), 1, figsize=(12, 2.8 * len(comparisons)), squeeze=False)
    for ax, (name, found) in zip(axes[:, 0], comparisons.items()):
        rows = found["rows"]
        labels = list(rows)
        changes = [100 * rows[n]["change"] for n in labels]
        bands = [100 * rows[n]["band"] for n in labels]
        benign = {n for n, bad in found["held_out"].items() if not bad} | {"mean_fpr"}
        colours = ["C3" if n in benign else "C0" for n in labels]
        ax.bar(range(len(labels)), changes, color=colours)
        ax.errorbar(range(len(labels)), [0] * len(labels), yerr=bands, fmt="none", ecolor="grey", capsize=3)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=7)
        verdict = "candidate" if found["candidate"] else "not a candidate"
        ax.set_title(f"{name}: mean of {found['seeds']['option']} seeds minus the core's ({verdict})", fontsize=9)
        ax.set_ylabel("points (F1 ×100)", fontsize=8)
    fig.suptitle("Gate-data options against the core: change of means (bars; red: benign / FPR), band (grey)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--options", default="harm_evals,people,asks,topics,pairs,crossfit", show_default=True)
@click.option("--out", default="gate_options", show_default=True)
def main(options: str, out: str) -> None:
    core = json.loads((RESULTS / f"{CORE}.json").read_text())
    comparisons, curves = {}, {"core": curve(core)}
    for name in options.split(","):
        path = RESULTS / f"{CORE}_{name}.json"
        if not path.exists():
            print(f"{name}: no {path.name}, skipped")
            continue
        option = json.loads(path.read_text())
        comparisons[name] = compare(core, option)
        curves[name] = curve(option)
        found = comparisons[name]
        failed = [c for c, ok in found["clauses"].items() if not ok]
        f1 = found["rows"]["f1_equal_prevalence"]
        print(
            f"{name}: F1 {f1['core_mean']:.4f} -> {f1['option_mean']:.4f} (band {f1['band']:.4f}); "
            f"{'candidate' if found['candidate'] else 'not a candidate: ' + ', '.join(failed)}"
        )
    if not comparisons:
        raise click.UsageError("no option's result file found; run benchmarks.gate_seed_noise --gate-data NAME first")
    curves = {name: points for name, points in curves.items() if points is not None}
    write_result(out, {"rule": __doc__.split("\n\n")[2], "comparisons": comparisons, "curves": curves})
    plot(comparisons, RESULTS / f"{out}.png")
    if len(curves) > 1:
        plot_curves(curves, RESULTS / f"{out}_curves.png")


if __name__ == "__main__":
    main()
