"""Probe contrast recipes: the (question, response, stance) examples a lock is extracted from.

* ``templates`` (default): each extraction question answered by a refusal template and by a compliant *opening*
  template (``probes/contrast_templates.json``); heads read at the last ``tokens`` response tokens.
* ``answers``: real answers — the base model's own greedy answers that the judge calls refusals, against full
  answers written by the packaged model that does not refuse (the teacher, cached), both teacher-forced through
  the base and read inside the content: the ``tokens`` before the last ``ANSWER_SKIP`` tokens (as the paper
  reads its responses). Balanced: as many compliant answers as refusals.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from safetylock import judge, models
from safetylock.contrast import ContrastExample, contrast_pairs
from safetylock.errors import ExtractError

TEACHER = "smollm2-135m-instruct"  # the packaged model that does not refuse
TEACHER_TOKENS = 160  # new tokens per teacher answer (at least 128)
OWN_TOKENS = 48  # new tokens per base answer in the answers recipe
ANSWER_SKIP = 5  # tokens left out at the end of a real answer before the recorded ones
MIN_EXAMPLES = 8  # per class
ANSWER_BATCH = 8  # prompts per generate call of cached greedy answers


@dataclass(frozen=True)
class Recipe:
    """How one recipe's examples are read: tokens skipped at the end of each response."""

    name: str
    skip: int


RECIPES = {"templates": Recipe("templates", 0), "answers": Recipe("answers", ANSWER_SKIP)}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ExtractError(f"unknown probe recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def greedy_answers(
    model_name: str, prompts: tuple[str, ...], max_new_tokens: int, enough: Callable[[list[str]], bool] | None = None
) -> list[str]:
    """Greedy answers of packaged model ``model_name`` to ``prompts``, generated into the cache, keyed by the whole
    tuple (batch composition can move a padded greedy answer, so answers are never mixed across calls).

    With ``enough``, generation stops after the first batch whose answers so far satisfy it, and the answers of that
    prefix are returned (and cached; a later call continues from them). Batches are the same ``ANSWER_BATCH`` slices
    as a whole-tuple call, so the prefix equals the first answers of that call.
    """
    from safetylock.hf import generate, load_model

    key = hashlib.sha256(json.dumps([model_name, max_new_tokens, prompts]).encode()).hexdigest()[:16]
    cached = models.cache_root() / "answers" / f"{key}.json"
    answers: list[str] = json.loads(cached.read_text()) if cached.exists() else []

    def complete() -> bool:
        return len(answers) == len(prompts) or (enough is not None and enough(answers))

    if not complete():
        model, tokenizer = load_model(models.resolve(model_name))
        with tqdm(total=len(prompts), initial=len(answers), desc=f"{model_name} answers", unit="prompt") as bar:
            while not complete():
                batch = prompts[len(answers) : len(answers) + ANSWER_BATCH]
                answers += generate(model, tokenizer, batch, max_new_tokens=max_new_tokens, batch_size=ANSWER_BATCH)
                bar.update(len(batch))
        models.write_json(cached, answers)
    return answers


def teacher_answers(prompts: tuple[str, ...], enough: Callable[[list[str]], bool] | None = None) -> list[str]:
    """The teacher's full answers to ``prompts`` (cached), or the first ones that satisfy ``enough``."""
    return greedy_answers(TEACHER, prompts, TEACHER_TOKENS, enough)


def answer_examples(model, tokenizer, questions: tuple[str, ...], tokens: int, progress: bool = True) -> list[ContrastExample]:
    """The ``answers`` recipe's examples: the base's own refusals (safe) and the teacher's full answers (unsafe)."""
    from safetylock.hf import generate

    own = generate(model, tokenizer, questions, max_new_tokens=OWN_TOKENS, batch_size=16, progress=progress)
    needed = tokens + ANSWER_SKIP

    def long_enough(text: str) -> bool:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= needed

    safe = [(i, a) for i, (q, a) in enumerate(zip(questions, own)) if judge.verdict(a, q) == "refusal" and long_enough(a)]
    if len(safe) < MIN_EXAMPLES:  # before the teacher's minutes of generation
        raise ExtractError(
            f"answers recipe: the model refused {len(safe)} of {len(questions)} questions at {needed}+ tokens; "
            f"need {MIN_EXAMPLES} (is it an aligned model?)"
        )
    taught = zip(questions, teacher_answers(questions))
    unsafe = [(i, a) for i, (q, a) in enumerate(taught) if judge.verdict(a, q) == "complied" and long_enough(a)]
    if len(unsafe) < MIN_EXAMPLES:
        raise ExtractError(f"answers recipe: only {len(unsafe)} teacher answers are substantive; need {MIN_EXAMPLES}")
    count = min(len(safe), len(unsafe))
    chosen = [(i, a, 1) for i, a in safe[:count]] + [(i, a, 0) for i, a in unsafe[:count]]
    return [ContrastExample(questions[i], a, label, i) for i, a, label in chosen]


def contrast_examples(
    name: str, model, tokenizer, questions: tuple[str, ...], tokens: int, seed: int, progress: bool = True
) -> list[ContrastExample]:
    """The examples of recipe ``name`` on ``questions`` (extraction split only)."""
    if recipe(name).name == "answers":
        return answer_examples(model, tokenizer, questions, tokens, progress)
    return contrast_pairs(questions, seed=seed)
