"""Contrast pairs: each harmful question answered safely (a refusal) and unsafely (a compliant opening)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class ContrastExample:
    """One (question, response) with its stance label: 1 = safe (refusal), 0 = unsafe (compliance)."""

    question: str
    response: str
    safe: int
    group: int  # index of the question: both answers of one question share it


def templates() -> dict[str, list[str]]:
    """The packaged safe / unsafe response templates."""
    text = resources.files("safetylock_probes").joinpath("contrast_templates.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return {"safe": list(data["safe"]), "unsafe": list(data["unsafe"])}


def task_phrase(question: str) -> str:
    """'Write a script that ...' -> 'write a script that ...' (for templates that restate the task, or put it
    mid-sentence): final punctuation dropped, first letter lower-cased unless it starts an acronym ('NASA')."""
    text = question.strip().rstrip(".!?").strip()
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def contrast_pairs(questions: tuple[str, ...] | list[str], seed: int = 0) -> list[ContrastExample]:
    """Two examples per question (safe first), with templates drawn by a seeded RNG."""
    pool = templates()
    rng = random.Random(seed)
    examples = []
    for group, question in enumerate(questions):
        task = task_phrase(question)
        for label, key in ((1, "safe"), (0, "unsafe")):
            response = rng.choice(pool[key]).format(task=task)
            examples.append(ContrastExample(question, response, label, group))
    return examples
