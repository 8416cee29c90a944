"""Other gate probes on the same features, under the gate's own protocol: do they recognise more kinds of request?

At the product gate's layer (16 of Qwen2.5-Coder-0.5B-Instruct's 24), the last prompt token's features of every
gate request (``safetylock.sources``, seed 0; cached by ``benchmarks.gate_sources``), scored leave-one-source-out
exactly as ``safetylock.gate.leave_one_source_out`` scores the linear gate (fit without the held-out source and
without any request holding one of its texts; thresholds at 1% / 5% of the other sources' benign calibration
requests), and on the packaged sources no gate here is fit on (``evaluate.UNSEEN_HARMFUL``; advice as benign).
Candidates:

* ``linear``: the product gate (``gate.fit_linear``: logistic regression, every (source, label) alike);
* ``mlp``: one hidden layer of 64 (GELU, dropout 0.2, AdamW, weight decay 0.01, 300 full-batch steps), same
  sample weights — a non-linear read of the same features;
* ``refusal``: the linear probe fit to the *aligned base's own behaviour* — label "refused" when the base's
  greedy 24-token answer to the request (vLLM, bfloat16) carries a refusal marker — instead of the source's label;
* ``harm-or-refusal``: one linear probe, label harmful *or* refused by the base;
* ``union``: the linear gate and the refusal probe side by side, firing when either does, both thresholds at one
  benign quantile chosen so that together they fire on at most the target share of benign calibration requests;
* ``per-source``: one linear probe per source with harmful requests (its harmful requests against every benign
  one), firing when any does, thresholds as for ``union`` — a gate with one direction per kind of harm;
* ``group-dro``: one linear probe fit for its *worst* (source, label) group rather than their average (group DRO,
  Sagawa et al. 2020: exponentiated group weights, step 0.05; L2 0.01; Adam, 400 full-batch steps) — a gate asked
  to hold on every kind it sees, in the hope that it then holds on kinds it does not;
* ``null-space-E``: AlphaSteer's read (Sheng et al. 2025) — the features projected on the benign fit requests'
  approximate null space (the directions that carry, together, a share ``E`` of their uncentred energy), then a
  ridge map of every harmful request to 1 (its steering matrix with a rank-one target, read as a score);
  ``null-space-linear-E``: the product's logistic fit on the same projection.

The base's answers are generated once per model and cached in the cache's ``gate/`` (their texts stay there), and
only when a candidate needs them (``REFUSAL_BASED``).

Run: python -m benchmarks.gate_probes [--layer 16] [--candidates linear,per-source --out NAME]
Writes benchmarks/results/gate_probes.{json,png} (rates only).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

from benchmarks.common import RESULTS, write_result
from benchmarks.gate_sources import UNSEEN_BENIGN, features_cached, gate_layers, request_key, unseen_requests
from safetylock import data, models
from safetylock.gate import (
    REPORT_FPRS,
    Heldout,
    auroc,
    balanced_weights,
    fit_linear,
    out_of_source_score,
    seen_masks,
    threshold_at,
)
from safetylock.judge import is_refusal
from safetylock.sources import Request, Sizes, gate_requests, split

Scorer = Callable[[np.ndarray], np.ndarray]  # features [n, hidden] -> scores [n, k] (k probes; fires if any fires)
Fitter = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], Scorer]  # (x, harmful, refused, sources)
OPENING_TOKENS = 24


def base_openings(model_dir: Path, requests: list[Request]) -> dict[str, str]:
    """The aligned base's greedy opening (``OPENING_TOKENS``) to each request as the gate sends it, by
    ``request_key``; generated with vLLM once per model and cached (only the missing requests are generated)."""
    path = models.cache_root() / "gate" / f"openings-{models.directory_digest(model_dir)[:16]}.json"
    store: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = list({request_key(r): r for r in requests if request_key(r) not in store}.items())
    if missing:
        from vllm import LLM, SamplingParams

        llm = LLM(
            str(model_dir), dtype="bfloat16", max_model_len=4096, seed=0, enforce_eager=True, kv_cache_memory_bytes=1 << 30
        )
        outputs = llm.chat([r.messages() for _, r in missing], SamplingParams(max_tokens=OPENING_TOKENS, temperature=0.0))
        store |= {key: out.outputs[0].text for (key, _), out in zip(missing, outputs)}
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(store))
        staged.replace(path)
        del llm
    return store


def linear(x: np.ndarray, harmful: np.ndarray, refused: np.ndarray, sources: np.ndarray, seed: int = 0) -> Scorer:
    weight, bias = fit_linear(x, harmful, sources, seed)
    return lambda z: (z @ weight + bias)[:, None]


def refusal(x: np.ndarray, harmful: np.ndarray, refused: np.ndarray, sources: np.ndarray, seed: int = 0) -> Scorer:
    return linear(x, refused, refused, sources, seed)


def harm_or_refusal(x: np.ndarray, harmful: np.ndarray, refused: np.ndarray, sources: np.ndarray, seed: int = 0) -> Scorer:
    return linear(x, harmful | refused, refused, sources, seed)


def union(x: np.ndarray, harmful: np.ndarray, refused: np.ndarray, sources: np.ndarray, seed: int = 0) -> Scorer:
    first, second = linear(x, harmful, refused, sources, seed), refusal(x, harmful, refused, sources, seed)
    return lambda z: np.concatenate([first(z), second(z)], axis=1)


def mlp(x: np.ndarray, harmful: np.ndarray, refused: np.ndarray, sources: np.ndarray, seed: int = 0) -> Scorer:
    import torch

    torch.manual_seed(seed)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    inputs = torch.tensor((x - mean) / scale, dtype=torch.float32)
    targets = torch.tensor(harmful, dtype=torch.float32)
    weights = torch.tensor(balanced_weights(harmful, sources), dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(x.shape[1], 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(inputs)[:, 0], targets, reduction="none")
        (loss * weights).mean().backward()
        optimizer.step()
    net.eval()

    def score(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.tensor((z - mean) / scale, dtype=torch.float32)).numpy()

    return score


def per_source(x: np.ndarray, harmful: np.ndarray, refused: np.ndarray, sources: np.ndarray, seed: int = 0) -> Scorer:
    """One linear probe per source with harmful requests, each against every benign request: one column each."""
    probes = []
    for source in sorted(set(sources[harmful].tolist())):
        rows = (harmful & (sources == source)) | ~harmful
        probes.append(fit_linear(x[rows], harmful[rows], sources[rows], seed))
    weights, biases = np.stack([w for w, _ in probes], axis=1), np.array([b for _, b in probes])
    return lambda z: z @ weights + biases


def group_dro(x: np.ndarray, harmful: np.ndarray, refused: np.ndarray, sources: np.ndarray, seed: int = 0) -> Scorer:
    import torch

    torch.manual_seed(seed)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    inputs = torch.tensor((x - mean) / scale, dtype=torch.float32)
    targets = torch.tensor(harmful, dtype=torch.float32)
    names = sorted({(s, bool(h)) for s, h in zip(sources.tolist(), harmful.tolist())})
    group = torch.tensor([names.index((s, bool(h))) for s, h in zip(sources.tolist(), harmful.tolist())])
    sizes = torch.bincount(group, minlength=len(names)).float()
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.02)
    mix = torch.full((len(names),), 1 / len(names))
    for _ in range(400):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(inputs @ weight + bias, targets, reduction="none")
        per_group = torch.zeros(len(names)).index_add(0, group, loss) / sizes
        mix = mix * torch.exp(0.05 * per_group.detach())
        mix = mix / mix.sum()
        optimizer.zero_grad()
        ((mix * per_group).sum() + 0.01 * (weight * weight).sum()).backward()
        optimizer.step()
    folded = weight.detach().double().numpy() / scale
    offset = float(bias.detach()) - folded @ mean
    return lambda z: (z @ folded + offset)[:, None]


NULL_SPACE_ENERGIES = (0.001, 0.01, 0.05, 0.2, 0.5)  # share of the benign activations' energy left in the null space


def benign_null_space(benign: np.ndarray, energy: float) -> np.ndarray:
    """An orthonormal basis [hidden, k] of the directions along which ``benign`` (rows: activations, uncentred, as
    AlphaSteer takes them) carries, all together, at most ``energy`` of its squared norm: the benign activations'
    approximate null space, largest-variance directions removed first."""
    values, vectors = np.linalg.eigh(benign.T @ benign)  # ascending
    kept = np.cumsum(values) <= energy * values.sum()
    return vectors[:, kept]


def null_space(energy: float, logistic: bool) -> Fitter:
    """AlphaSteer's read (Sheng et al. 2025): the features projected on the benign fit requests' null space, then
    a ridge map of harmful requests to 1 (its steering matrix with a rank-one target, as a score) or, with
    ``logistic``, the product gate's logistic fit on the projected features."""

    def fitter(x: np.ndarray, harmful: np.ndarray, refused: np.ndarray, sources: np.ndarray, seed: int = 0) -> Scorer:
        basis = benign_null_space(x[~harmful], energy)
        z = x @ basis
        if logistic:
            weight, bias = fit_linear(z, harmful, sources, seed)
            return lambda q: ((q @ basis) @ weight + bias)[:, None]
        rows = z[harmful]
        weights = balanced_weights(harmful, sources)[harmful]  # each harmful source alike
        gram = (rows * weights[:, None]).T @ rows
        ridge = 0.1 * np.trace(gram) / len(gram)
        weight = np.linalg.solve(gram + ridge * np.eye(len(gram)), (rows * weights[:, None]).sum(0))
        return lambda q: ((q @ basis) @ weight)[:, None]

    return fitter


CANDIDATES: dict[str, Fitter] = {
    "linear": linear,
    "mlp": mlp,
    "refusal": refusal,
    "harm-or-refusal": harm_or_refusal,
    "union": union,
    "per-source": per_source,
    "group-dro": group_dro,
    **{f"null-space-{energy}": null_space(energy, logistic=False) for energy in NULL_SPACE_ENERGIES},
    **{f"null-space-linear-{energy}": null_space(energy, logistic=True) for energy in NULL_SPACE_ENERGIES},
}
REFUSAL_BASED = {"refusal", "harm-or-refusal", "union"}  # fit on the base's own refusals: need its answers


def thresholds_at(benign: np.ndarray, fpr: float) -> np.ndarray:
    """One threshold per probe column, all at the same benign quantile, the largest share at which the probes
    together fire on at most ``fpr`` of ``benign`` (one column: ``gate.threshold_at``)."""
    if benign.shape[1] == 1:
        return np.array([threshold_at(benign[:, 0], fpr)])
    for share in np.linspace(fpr, 0.0, 201):
        limits = np.quantile(benign, 1 - share, axis=0)
        if (benign > limits).any(axis=1).mean() <= fpr:
            return limits
    return np.full(benign.shape[1], np.inf)


def fires(scores: np.ndarray, limits: np.ndarray) -> np.ndarray:
    return (scores > limits).any(axis=1)


def rate(hit: np.ndarray) -> float:
    return round(float(hit.mean()), 4) if len(hit) else float("nan")


def loso(
    fitter: Fitter,
    x: np.ndarray,
    requests: list[Request],
    refused: np.ndarray,
    fit: np.ndarray,
    calibration: np.ndarray,
    fprs: tuple[float, ...] = REPORT_FPRS,
) -> list[Heldout]:
    """``gate.leave_one_source_out`` with any candidate (AUROC on the first probe column), thresholds at ``fprs``."""
    harmful = np.array([r.harmful for r in requests])
    sources = np.array([r.source for r in requests])
    seen = seen_masks(requests)
    rows = []
    for held in sorted(set(sources.tolist())):
        unseen = ~seen[held]
        train = fit[unseen[fit]]
        scorer = fitter(x[train], harmful[train], refused[train], sources[train])
        negatives = scorer(x[calibration[unseen[calibration] & ~harmful[calibration]]])
        limits = {f"{round(100 * f)}%": thresholds_at(negatives, f) for f in fprs}
        scores = scorer(x[sources == held])
        positive, negative = scores[harmful[sources == held]], scores[~harmful[sources == held]]
        rows.append(
            Heldout(
                held,
                len(positive),
                len(negative),
                {k: rate(fires(positive, t)) for k, t in limits.items()} if len(positive) else {},
                {k: rate(fires(negative, t)) for k, t in limits.items()} if len(negative) else {},
                round(auroc(positive[:, 0], negatives[:, 0]), 4) if len(positive) else None,
            )
        )
    return rows


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True)
@click.option("--layer", type=int, default=16, show_default=True, help="The gate layer (a candidate layer).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--candidates",
    default=",".join(CANDIDATES),
    show_default=True,
    help="Comma-separated candidates to score (the base's answers are generated only for refusal-based ones).",
)
@click.option("--out", default="gate_probes", show_default=True)
def main(model_name: str, layer: int, seed: int, candidates: str, out: str) -> None:
    started = time.perf_counter()
    model_dir = models.resolve(model_name)
    requests = list(gate_requests(data.advbench(), Sizes(), seed=seed))
    layers = gate_layers(model_dir)
    if layer not in layers:
        raise click.BadParameter(f"layer {layer} is not a candidate gate layer ({layers})", param_hint="--layer")
    chosen = [c.strip() for c in candidates.split(",") if c.strip()]
    if not chosen or set(chosen) - set(CANDIDATES):
        raise click.BadParameter(f"choose from {', '.join(CANDIDATES)}, got {candidates!r}", param_hint="--candidates")
    x = features_cached(model_dir, requests, layers)[layer].astype(np.float64)
    unseen = unseen_requests(seed)
    harmful, sources = np.array([r.harmful for r in requests]), np.array([r.source for r in requests])
    fit, calibration = (np.asarray(part) for part in split(requests, seed=seed))
    unseen_x = {name: features_cached(model_dir, asked, [layer])[layer].astype(np.float64) for name, asked in unseen.items()}
    openings: dict[str, str] = {}
    refused = np.zeros(len(requests), bool)  # read only by refusal-based candidates
    base_refusal: dict[str, dict] = {}
    if REFUSAL_BASED & set(chosen):
        openings = base_openings(model_dir, requests + [r for asked in unseen.values() for r in asked])
        refused = np.array([is_refusal(openings[request_key(r)]) for r in requests])
        for s in sorted(set(sources.tolist())):
            mine = sources == s
            base_refusal[s] = {
                "harmful": rate(refused[mine & harmful]) if (mine & harmful).any() else None,
                "benign": rate(refused[mine & ~harmful]) if (mine & ~harmful).any() else None,
            }
        for name, asked in unseen.items():
            answered = np.array([is_refusal(openings[request_key(r)]) for r in asked])
            base_refusal[name] = {"harmful" if name != UNSEEN_BENIGN else "benign": rate(answered)}
    results = {}
    for name in chosen:
        fitter = CANDIDATES[name]
        table = loso(fitter, x, requests, refused, fit, calibration)
        scorer = fitter(x[fit], harmful[fit], refused[fit], sources[fit])
        benign = scorer(x[calibration[~harmful[calibration]]])
        limits = {f"{round(100 * f)}%": thresholds_at(benign, f) for f in REPORT_FPRS}
        unseen_scores = {u: scorer(z) for u, z in unseen_x.items()}  # once per source, not per threshold
        results[name] = {
            "out_of_source_score": round(out_of_source_score(table), 4),
            "heldout": [row.to_dict() for row in table],
            "unseen": {u: {k: rate(fires(z, t)) for k, t in limits.items()} for u, z in unseen_scores.items()},
        }
        print(name, json.dumps({k: results[name][k] for k in ("out_of_source_score", "unseen")}), flush=True)
    write_result(
        out,
        {
            "model": model_name,
            "layer": layer,
            "protocol": "leave-one-source-out at the gate layer (thresholds at 1%/5% FPR of the other sources' "
            "benign calibration requests, held-out source scored whole); unseen sources: fit on every source's fit "
            "split, thresholds on all benign calibration requests; rates only",
            "openings": {
                "tokens": OPENING_TOKENS,
                "digest": hashlib.sha256(json.dumps(openings, sort_keys=True).encode()).hexdigest()[:16],
            }
            if openings
            else None,
            "base_refusal": base_refusal,
            "candidates": results,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    plot(results, RESULTS / f"{out}.png")


def plot(results: dict, path: Path) -> None:
    """Held-out TPR at 5% FPR per harmful source (and firing on benign kinds), one bar group per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    rows = {}
    for name in names:
        for row in results[name]["heldout"]:
            rows.setdefault(row["source"], {})[name] = row["tpr"].get("5%", row["fpr"].get("5%"))
        for source, rates in results[name]["unseen"].items():
            rows.setdefault(f"{source} (unseen)", {})[name] = rates["5%"]
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(14, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(len(labels)) + i * width, [rows[s].get(name, np.nan) for s in labels], width, label=name)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("share firing at 5% FPR")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Gate probes at one layer, leave one source out: TPR on harmful sources, firing on benign ones")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
