"""Offline generation through vLLM's ``LLM`` class, plain or locked by the plugin (same engine as the server)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetylock.hf import PLAIN, Framing, Generator
from safetylock.serve.config import CONFIG_KEY
from safetylock.serve.server import engine_settings


def vllm_generator(model_dir: Path, section: dict | None = None, framing: Framing = PLAIN, **engine_args: Any) -> Generator:
    """Greedy chat completions through vLLM's offline ``LLM`` class, with the safetylock plugin when locked."""
    from vllm import LLM, SamplingParams

    args = {**engine_settings(model_dir), **engine_args}
    if section is not None:
        args["additional_config"] = {CONFIG_KEY: section}
    llm = LLM(str(model_dir), **args)

    def generate(prompts: Sequence[str], max_tokens: int) -> list[str]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        conversations = [framing.messages(p) for p in prompts]
        return [out.outputs[0].text.strip() for out in llm.chat(conversations, params, use_tqdm=True)]

    return generate
