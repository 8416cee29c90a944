"""Plots people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

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
