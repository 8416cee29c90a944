"""Plots people would rather look at than read."""

from __future__ import annotations

import textwrap
from pathlib import Path

from safetylock.gate import Gate
from safetylock.lockfile import SafetyLock


def accuracy_heatmap(lock: SafetyLock, path: Path) -> Path:
    """Per-(layer, head) probe validation accuracy, with the locked heads outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    acc = lock.head_accuracy.numpy()
    fig, ax = plt.subplots(figsize=(max(4, acc.shape[1] * 0.45), max(3, acc.shape[0] * 0.3)))
    image = ax.imshow(acc, aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0, origin="lower")
    for layer, head in zip(lock.layers.tolist(), lock.heads.tolist()):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"probe validation accuracy ({lock.num_heads_locked} locked heads outlined)")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gate_plot(gate: Gate, path: Path) -> Path:
    """The gate's ROC on its calibration split (threshold marked) and the calibration AUROC of every layer tried."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calibration = gate.calibration
    fig, (roc, layers) = plt.subplots(1, 2, figsize=(10, 4))
    points = calibration.get("roc") or []
    roc.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    if "fpr" in calibration:
        roc.plot([calibration["fpr"]], [calibration["tpr"]], "ro", label=f"threshold {gate.threshold:.3g}")
        roc.legend(loc="lower right")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc.set_xlabel("benign requests firing (FPR)")
    roc.set_ylabel("harmful requests firing (TPR)")
    roc.set_title(f"gate at layer {gate.layer}: AUROC {calibration.get('auroc', float('nan')):.3f}")
    score = "layer_score" if "layer_score" in calibration else "layer_auroc"  # older gates: in-distribution AUROC
    by_layer = sorted((int(k), v) for k, v in (calibration.get(score) or {}).items())
    layers.plot([k for k, _ in by_layer], [v for _, v in by_layer], marker="o")
    layers.axvline(gate.layer, color="red", linestyle="--")
    layers.set_xlabel("layer")
    layers.set_ylabel("leave-one-source-out score" if score == "layer_score" else "calibration AUROC")
    layers.set_title("candidate layers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


METRICS = {"harmful": "harmful_answer_rate", "benign": "over_refusal_rate", "utility": "accuracy"}


def load_run(path: Path) -> dict:
    """A `safetylock eval` result file, checked enough to compare."""
    import json

    from safetylock.data import DataError
    from safetylock.evaluate import rejudge

    try:
        run = rejudge(json.loads(path.read_text()))
        suites = run["suites"]
        for suite in suites.values():
            suite["summary"][METRICS[suite["kind"]]]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise DataError(f"{path} is not a safetylock eval result") from None
    run.setdefault("target", {}).setdefault("label", path.stem)
    return run


def percent(summary: dict, metric: str) -> str:
    """``12.5% ±3.1``: a rate and, where the summary has it, its standard error, in percentage points."""
    se = summary.get(f"{metric}_se")
    return f"{100 * summary[metric]:.1f}%" + ("" if se is None else f" ±{100 * se:.1f}")


def comparison_rows(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per run: each suite's headline metric, in percent."""
    columns: list[tuple[str, str]] = []
    for run in runs:
        for name, suite in run["suites"].items():
            if (name, suite["kind"]) not in columns:
                columns.append((name, suite["kind"]))
    locked = [run for run in runs if run["target"].get("lock_fingerprint")]

    def where(name: str) -> str:
        """Whether the locked runs' fits drew from this suite's source (``safetylock.overlap``)."""
        if not locked or name == "arithmetic":
            return ""
        labels = [run["suites"].get(name, {}).get("in_distribution") or {} for run in locked]
        if any("unverified" in label for label in labels):
            return " (fit data unverified)"
        return " (in-distribution)" if any(labels) else " (source unseen by the lock)"

    header = ["run", *(f"{name} {METRICS[kind]}{where(name)}" for name, kind in columns)]
    rows = []
    for run in runs:
        row = [run["target"]["label"]]
        for name, kind in columns:
            suite = run["suites"].get(name)
            row.append(percent(suite["summary"], METRICS[kind]) if suite else "-")
        rows.append(row)
    return header, rows


def aligned_text(header: list[str], rows: list[list[str]]) -> str:
    """The table as left-aligned columns separated by two spaces (for terminals and logs)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows])


def comparison_plot(runs: list[dict], path: Path) -> Path:
    """Grouped bars: one group per suite metric, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    header, rows = comparison_rows(runs)
    metrics = header[1:]
    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(metrics)) + 3, 3.8))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [float(cell.split("%")[0]) if cell != "-" else np.nan for cell in row[1:]]
        ax.bar(np.arange(len(metrics)) + i * width, values, width, label=row[0])
    labels = [textwrap.fill(metric, 26) for metric in metrics]
    ax.set_xticks(np.arange(len(metrics)) + width * (len(rows) - 1) / 2, labels, fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
