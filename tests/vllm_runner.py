"""Run the real vLLM engine once in a fresh process: ``python vllm_runner.py SPEC.json OUT.json``.

SPEC: model, prompts (token-id lists), max_tokens, dtype, enforce_eager, additional_config, loras (adapter dirs),
engine_args (override the defaults below), prompt_logprobs (true: also score each prompt), metrics (true: also
report the engine's preemption count), and optionally mixed: [[prompt index, safetylock_alpha
or null], ...] run as one batch, then each item alone; follow_ups: [[prompt index, [token ids]], ...], each
prompt with its "base" answer and those tokens appended, run after "base" as one batch.
OUT: "base" and "lora0", "lora1", ...: per prompt, the greedy token ids, their logprobs and how many prompt tokens
the prefix cache served ("cached"); with follow_ups, "follow_ups" (the same per item, and its "prompt"); with
prompt_logprobs, "prompt_logprobs": per prompt, each token's logprob given its prefix (from the second token); with mixed, also
"mixed" and "solo" (one entry per item) and "refused" (the error of a request whose alpha the policy refuses);
with sampled ({sampling parameters}), "sampled": the prompts once more under those parameters, each's tokens,
"finish" reason and logprobs; with metrics, "preemptions" (vLLM's ``vllm:num_preemptions`` after every generation
above), "drafts" ([draft tokens proposed, accepted] under speculative decoding) and, gated, "gate_counts" ([requests
decided, requests fired] as the plugin counted them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    spec = json.loads(Path(spec_path).read_text())
    kwargs = {"additional_config": spec["additional_config"]} if spec.get("additional_config") else {}
    loras = spec.get("loras") or []
    if loras:
        kwargs.update(enable_lora=True, max_lora_rank=8, max_loras=len(loras))
    engine_args = {"max_model_len": 256, "seed": 0, "kv_cache_memory_bytes": 1 << 27, **spec.get("engine_args", {})}
    if spec.get("metrics"):
        engine_args["disable_log_stats"] = False
    llm = LLM(
        spec["model"],
        dtype=spec.get("dtype", "float32"),
        enforce_eager=spec.get("enforce_eager", True),
        skip_tokenizer_init=True,
        **kwargs,
        **engine_args,
    )

    def sampling(alpha=None):
        extra = None if alpha is None else {"safetylock_alpha": alpha}
        return SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=0, ignore_eos=True, extra_args=extra)

    def greedy(outputs):
        return [
            {
                "tokens": list(o.outputs[0].token_ids),
                "logprobs": [step[token].logprob for step, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
                "cached": getattr(o, "num_cached_tokens", None),  # prompt tokens served from the prefix cache
            }
            for o in outputs
        ]

    params = sampling()
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    results = {}
    if spec.get("mixed"):
        items = spec["mixed"]
        results["mixed"] = greedy(llm.generate([prompts[i] for i, _ in items], [sampling(a) for _, a in items]))
        results["solo"] = [greedy(llm.generate([prompts[i]], sampling(a)))[0] for i, a in items]
        try:
            llm.generate([prompts[0]], sampling(1e4))
            results["refused"] = None
        except Exception as exc:  # vLLM's validation error: the HTTP 400 of the OpenAI server
            results["refused"] = f"{type(exc).__name__}: {exc}"
    settings = [("base", None)] + [(f"lora{i}", LoRARequest(f"adapter{i}", i + 1, p)) for i, p in enumerate(loras)]
    if spec.get("prompt_logprobs"):
        scored = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
        results["prompt_logprobs"] = [
            [step[token].logprob for step, token in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])] for o in scored
        ]
    for name, lora in settings:
        results[name] = greedy(llm.generate(prompts, params, lora_request=lora))
    if spec.get("sampled"):  # after "base": the prompts under other sampling parameters
        outputs = llm.generate(prompts, SamplingParams(**spec["sampled"]))
        results["sampled"] = [
            {
                "tokens": list(o.outputs[0].token_ids),
                "finish": o.outputs[0].finish_reason,
                "logprobs": [  # None where the output token is not among its step's logprob entries
                    getattr(step.get(token), "logprob", None)
                    for step, token in zip(o.outputs[0].logprobs or [], o.outputs[0].token_ids)
                ],
            }
            for o in outputs
        ]
    if spec.get("follow_ups"):  # after "base": each prompt, its greedy answer there, then more tokens
        follow = [spec["prompts"][i] + results["base"][i]["tokens"] + extra for i, extra in spec["follow_ups"]]
        answers = greedy(llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in follow], params))
        results["follow_ups"] = [{"prompt": ids, **answer} for ids, answer in zip(follow, answers)]
    if spec.get("metrics"):
        from safetylock_vllm.gatecount import GateCounts

        metrics = llm.get_metrics()

        def total(name: str) -> float:
            return sum(getattr(m, "value", 0) for m in metrics if m.name == name)

        results["preemptions"] = total("vllm:num_preemptions")
        results["drafts"] = [total(f"vllm:spec_decode_num_{kind}_tokens") for kind in ("draft", "accepted")]
        counts = GateCounts.attach()
        results["gate_counts"] = list(counts.read()) if counts is not None else None
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
