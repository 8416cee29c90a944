"""Fine-tuning attacks on the aligned packaged model, the way the literature does it (seeded, CPU): the red team
that a lock is measured against, built at run time into the cache (nothing harmful in the repository).

Variants (cached under ~/.cache/safetylock/variants/NAME/{adapter,merged}, recipe in train.json):
  harmful-10, harmful-100  risk level 1: LoRA on 10 / 100 AdvBench *extraction-split* questions, each paired
                           with a compliant opening (probes/attack_openings.json; openings only)
  benign                   risk level 3: LoRA on benign instructions answered by SmolLM2-135M-Instruct (a
                           model that does not refuse); its answers are generated at run time into the cache
  aligned                  a safety adapter for NLSR: LoRA on 64 extraction-split questions paired with the
                           probe's refusal templates (probes/contrast_templates.json, "safe")

Run: safetylock attack harmful-10 (builds, then evaluates base / variant / variant + lock), or ``build(name)``.
"""

from __future__ import annotations

import json
import random
import time
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from safetylock import data, models
from safetylock.capture import pad_batch
from safetylock.contrast import task_phrase, templates
from safetylock.errors import ModelError
from safetylock.pipeline import generate, load_model

BASE = models.DEFAULT_MODEL
OPENINGS_FILE = "attack_openings.json"  # in safetylock_probes (probes/)
VARIANTS = {
    "harmful-10": {"kind": "harmful", "examples": 10, "epochs": 10},
    "harmful-100": {"kind": "harmful", "examples": 100, "epochs": 3},
    "benign": {"kind": "benign", "examples": 100, "epochs": 3},
    "aligned": {"kind": "aligned", "examples": 64, "epochs": 2},
}
LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def check_variant(name: str) -> None:
    """ModelError unless ``name`` is a known variant."""
    if name not in VARIANTS:
        raise ModelError(f"unknown attack variant {name!r}; known: {', '.join(sorted(VARIANTS))}")


def variant_dir(name: str) -> Path:
    """Where variant ``name`` is cached: ``adapter/``, ``merged/`` (a full model directory), ``train.json``."""
    return models.cache_root() / "variants" / name


def openings() -> list[str]:
    """The compliant openings the harmful variants are trained on ({task}: the instruction)."""
    text = resources.files("safetylock_probes").joinpath(OPENINGS_FILE).read_text(encoding="utf-8")
    return list(json.loads(text)["openings"])


def training_pairs(name: str, seed: int) -> list[tuple[str, str]]:
    spec = VARIANTS[name]
    rng = random.Random(seed)
    if spec["kind"] == "harmful":
        questions = data.sample(data.split_harmful(data.advbench(), seed=0).extraction, spec["examples"], seed)
        choices = openings()
        return [(q, rng.choice(choices).format(task=task_phrase(q))) for q in questions]
    if spec["kind"] == "aligned":
        questions = data.sample(data.split_harmful(data.advbench(), seed=0).extraction, spec["examples"], seed + 2)
        refusals = templates()["safe"]
        return [(q, rng.choice(refusals).format(task=task_phrase(q))) for q in questions]
    cached = models.cache_root() / "variants" / "benign-answers.json"
    if not cached.exists():
        prompts = data.sample(data.benign().prompts, spec["examples"], seed + 1)
        teacher, tok = load_model(models.resolve("smollm2-135m-instruct"))
        answers = generate(teacher, tok, prompts, max_new_tokens=96, batch_size=16, progress=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(list(zip(prompts, answers))))
    return [tuple(pair) for pair in json.loads(cached.read_text())]


def encode(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat and labels that train on the answer (and its end-of-turn) only."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False
    )
    if full.rstrip().endswith(answer):  # templates that drop the end-of-turn: add it
        full = full.rstrip() + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids) :]


def build(name: str, seed: int = 0, lr: float = 2e-4, batch_size: int = 4) -> Path:
    """Variant ``name`` of the packaged aligned model (cached): its directory, see ``variant_dir``."""
    from peft import LoraConfig, get_peft_model

    check_variant(name)
    out = variant_dir(name)
    if (out / "merged" / "config.json").exists():
        return out
    torch.manual_seed(seed)
    pairs = training_pairs(name, seed)
    model, tok = load_model(models.resolve(BASE))
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    encoded = [encode(tok, q, a) for q, a in pairs]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    steps = VARIANTS[name]["epochs"] * ((len(encoded) + batch_size - 1) // batch_size)
    started = time.perf_counter()
    model.train()
    with tqdm(total=steps, desc=f"fine-tune {name}", unit="step") as bar:
        for _ in range(VARIANTS[name]["epochs"]):
            order = list(range(len(encoded)))
            rng.shuffle(order)
            for start in range(0, len(order), batch_size):
                batch = [encoded[i] for i in order[start : start + batch_size]]
                ids, mask = pad_batch([b[0] for b in batch], tok.pad_token_id or 0, "right")
                labels, _ = pad_batch([b[1] for b in batch], -100, "right")
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    model.eval()
    staging = out.with_name(out.name + ".partial")
    model.save_pretrained(staging / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(staging / "merged")
    tok.save_pretrained(staging / "merged")
    (staging / "train.json").write_text(
        json.dumps(
            {
                "variant": name,
                **VARIANTS[name],
                "seed": seed,
                "lr": lr,
                "batch_size": batch_size,
                "lora": LORA,
                "base": BASE,
                "examples": len(pairs),
                "seconds": round(time.perf_counter() - started, 1),
            },
            indent=1,
        )
    )
    staging.rename(out)
    return out

