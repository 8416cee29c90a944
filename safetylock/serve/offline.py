"""Offline generation through vLLM's ``LLM`` class, plain or locked by the plugin (same engine as the server)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetylock.hf import PLAIN, Framing, Prompt
from safetylock.serve.config import CONFIG_KEY
from safetylock.serve.server import engine_settings, v1_runner_pin


class VllmGenerator:
    """Greedy chat completions through vLLM's offline ``LLM`` class, with the safetylock plugin when locked; a
    ``Generator``. ``close()`` shuts its engine down (a process that only returns leaves the engine's own
    process waiting, and a multiprocessing child waits for it at exit)."""

    def __init__(self, model_dir: Path, section: dict | None = None, framing: Framing = PLAIN, **engine_args: Any):
        from vllm import LLM

        args = {**engine_settings(model_dir), **engine_args}
        if section is not None:
            args["additional_config"] = {CONFIG_KEY: section}
        os.environ.update(v1_runner_pin(section, os.environ))  # read by the engine's processes as they start
        self.framing = framing
        self.llm = LLM(str(model_dir), **args)

    def __call__(self, prompts: Sequence[Prompt], max_tokens: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        conversations = [self.framing.messages(p) for p in prompts]
        return [out.outputs[0].text.strip() for out in self.llm.chat(conversations, params, use_tqdm=True)]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
