"""Commands that serve: serve (vLLM's OpenAI server with the plugin) and demo."""

from __future__ import annotations

from pathlib import Path

import click

from safetylock import models
from safetylock.cli.common import (
    ALPHA,
    _response_section,
    alpha_option,
    lock_option,
    main,
    model_option,
    response_options,
    user_errors,
)
from safetylock.cli.locks import cached_lock


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
@click.option(
    "--allow-prefill",
    is_flag=True,
    help="Gated: also serve prompts that pre-fill an assistant turn (continue_final_message); refused by default.",
)
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
    allow_prefill: bool,
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
        allow_prefill=allow_prefill,
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
    """Serve MODEL twice through vLLM, unsteered and locked, and answer the same prompts side by side. A lock with
    a gate is served gated, requests whose gate fires answered with the refusal (the refuse response); a lock
    without one is served always on at its α."""
    from rich.console import Console
    from rich.table import Table

    from safetylock.lockfile import load
    from safetylock.serve.config import lock_section
    from safetylock.serve.server import DEMO_PROMPTS, side_by_side

    model_dir = models.resolve(model_name)
    lock_path = cached_lock(lock_path, model_name)
    gated = load(lock_path).gate is not None
    section = lock_section(lock_path, alpha, gated=gated) | ({"response": "refuse"} if gated else {})
    console = Console()
    with console.status("starting the unsteered and the locked vLLM server, then both answer ..."):
        try:
            rows = side_by_side(model_dir, section, DEMO_PROMPTS, max_tokens, enforce_eager)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
    mode = "gated, refuse" if gated else "always on"
    table = Table(title=f"{model_name}: unsteered vs locked (vLLM + safetylock plugin)", show_lines=True)
    table.add_column("prompt", ratio=1)
    table.add_column("unsteered", ratio=2)
    table.add_column(f"locked ({lock_path.name}, {mode})", ratio=2)
    for row in rows:
        table.add_row(*row)
    console.print(table)
