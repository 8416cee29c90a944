"""The refuse response under structured output, on the real model: what a client in JSON mode gets.

The product lock served gated (refuse, the default) through ``safetylock serve`` on the aligned base and on attack
variants (each with its gate refit as served, ``calibrate-gate``'s default, as in ``benchmarks.cross_source``):
chat requests from AdvBench's held-out half (harmful, in-distribution for the gate) and from the benign
instructions, each sent with ``response_format`` ``json_object`` and without. Per cell: HTTP statuses, how many
answers are the refusal message, how many begin as a JSON object, how many parse whole (within the token budget),
finish reasons. Before ``safetylock_vllm.grammar`` every fired JSON-mode request answered HTTP 500.

Run: python -m benchmarks.structured_refusal [--variants harmful-10] [--count 20] [--max-tokens 64]
Writes benchmarks/results/structured_refusal.json (counts only; answers are not written).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from benchmarks.common import calibrated_lock, write_result
from benchmarks.responses import product_lock
from safetylock.attack import BASE, served
from safetylock.evaluate import load_suite
from safetylock.hf import Framing
from safetylock.respond import DEFAULT_REFUSAL
from safetylock.serve.config import lock_section
from safetylock.serve.server import free_port, start_server, wait_healthy

ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-batched-tokens", "256"]
KV_BYTES = 2 << 30


def ask(port: int, model: str, prompt: str, json_mode: bool, max_tokens: int, framing: Framing) -> dict:
    """One chat request as the variant's attacker frames it (its system prompt and prompt prefix, if any)."""
    body = {"model": model, "messages": framing.messages(prompt), "max_tokens": max_tokens, "temperature": 0}
    body |= {"response_format": {"type": "json_object"}} if json_mode else {}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            choice = json.loads(response.read())["choices"][0]
    except urllib.error.HTTPError as error:
        return {"status": error.code}
    return {"status": 200, "content": choice["message"]["content"] or "", "finish": choice["finish_reason"]}


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def counts(answers: list[dict]) -> dict:
    """Counts only: statuses, refusal messages, JSON-shaped and whole-JSON answers, finish reasons."""
    texts = [a.get("content", "") for a in answers]
    return {
        "requests": len(answers),
        "status": dict(sorted(Counter(str(a["status"]) for a in answers).items())),
        "refusal_message": sum(t == DEFAULT_REFUSAL for t in texts),
        "json_object_start": sum(t.lstrip().startswith("{") for t in texts),
        "json_parses": sum(parses(t) for t in texts),
        "finish": dict(sorted(Counter(str(a.get("finish")) for a in answers).items())),
    }


def serve_and_ask(
    model: str, lock: Path, framing: Framing, suites: dict[str, tuple[str, ...]], max_tokens: int, log: Path
) -> dict:
    port = free_port()
    args = [*ENGINE_ARGS, "--kv-cache-memory-bytes", str(KV_BYTES)]
    proc = start_server(Path(model), port, lock_section(lock, 4.0, gated=True), args, log=log.open("w"))
    try:
        wait_healthy(proc, port, timeout=900)
        cells = {}
        with ThreadPoolExecutor(8) as pool:
            for kind, prompts in suites.items():
                for json_mode in (True, False):
                    asks = [(port, model, prompt, json_mode, max_tokens, framing) for prompt in prompts]
                    answers = list(pool.map(lambda arguments: ask(*arguments), asks))
                    cells[f"{kind}, {'json_object' if json_mode else 'plain'}"] = counts(answers)
        return cells
    finally:
        proc.terminate()
        proc.wait(60)


@click.command()
@click.option("--variants", default="harmful-10", show_default=True, help="Comma-separated attack variants (and the base).")
@click.option("--count", type=int, default=20, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--out", default="structured_refusal", show_default=True)
def main(variants: str, count: int, max_tokens: int, out: str) -> None:
    from safetylock import models

    started = time.perf_counter()
    lock = product_lock()
    suites = {
        "advbench-heldout": load_suite("advbench-heldout", count, 0).prompts,
        "benign": load_suite("benign", count, 0).prompts,
    }
    logs = models.cache_root() / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in ["aligned-base", *[v for v in variants.split(",") if v]]:
        model, framing = (BASE, Framing()) if name == "aligned-base" else served(name)
        served_lock = lock if name == "aligned-base" else calibrated_lock(lock, name, model, framing, refit=True)
        log = logs / f"{out}-{name}.log"
        results[name] = serve_and_ask(str(models.resolve(model)), served_lock, framing, suites, max_tokens, log)
        print(name, json.dumps(results[name]), flush=True)
    write_result(
        out,
        {
            "protocol": "gated lock, refuse response, served through the plugin (vLLM OpenAI server, bfloat16, greedy); "
            "each prompt as a chat request with response_format json_object and without; counts only",
            "lock": str(lock.name),
            "count": count,
            "max_tokens": max_tokens,
            "cells": results,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )


if __name__ == "__main__":
    main()
