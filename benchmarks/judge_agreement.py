"""How often the three-way judge agrees with hand labels of cached evaluation answers.

Run: python -m benchmarks.judge_agreement [--out judge_agreement] [--model-judge qwen2.5-coder-0.5b-instruct]
Reads benchmarks/judge_labels.json (run stem, suite, item index, label; no text) and the cached runs under
~/.cache/safetylock/runs; writes benchmarks/results/judge_agreement.json (counts only) and, for the cells whose
every answer is labelled, a plot of complied by hand against by the judge (judge_agreement.png). Cells whose run is
not cached are listed as missing. Also scores ``judge.refusal_fit`` against the hand labels of refusals (``fit``:
the set read while the rule was written, and a held-out set labelled after): benchmarks/results/judge_fit.json.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
from tqdm import tqdm

from benchmarks.common import RESULTS, bar_figure, write_result
from safetylock.evaluate import RUBRIC, stored_request
from safetylock.judge import VERDICTS, refusal_fit, verdict
from safetylock.models import cache_root

LABELS = Path(__file__).with_name("judge_labels.json")


@dataclass(frozen=True)
class Answer:
    """One cached answer: its run, suite (and the suite's kind) and index there, the stored item, the rules' verdict
    and its hand label ("" where none)."""

    stem: str
    suite: str
    kind: str
    index: int
    item: dict
    judged: str
    suite_size: int
    label: str = ""

    @property
    def variant(self) -> str:
        """The served model the run is of (the run's label before any ``+`` lock or framing)."""
        return self.stem.rsplit("-", 1)[0].split("+")[0]

    @property
    def request(self) -> str:
        return stored_request(self.item)

    def rubric(self) -> str:
        """The LLM judge's question about this answer."""
        return RUBRIC.format(prompt=self.request, response=self.item["response"])


@functools.cache
def run_suites(stem: str) -> dict:
    """A cached run's suites, read once."""
    return json.loads((cache_root() / "runs" / f"{stem}.json").read_text())["suites"]


def cached_answers(stem: str, suite: str, labels: dict[str, str] | None = None) -> list[Answer]:
    """A cached run's answers to one suite, judged by the rules: the labelled ones with their labels, or with no
    ``labels`` every answer."""
    found = run_suites(stem)[suite]
    items = found["items"]
    marked = labels if labels is not None else {str(i): "" for i in range(len(items))}
    answers = []
    for index, label in marked.items():
        item = items[int(index)]
        judged = verdict(item["response"], stored_request(item))
        answers.append(Answer(stem, suite, found["kind"], int(index), item, judged, len(items), label))
    return answers


def labelled_answers(labels: dict) -> tuple[list[Answer], list[str]]:
    """Every labelled answer whose run is cached here, judged by the rules, and the stems of the runs that are not."""
    rows, missing = [], []
    for stem, suites in labels.items():
        if not (cache_root() / "runs" / f"{stem}.json").exists():
            missing.append(stem)
            continue
        for suite, marked in suites.items():
            rows += cached_answers(stem, suite, marked)
    return rows, missing


@click.command()
@click.option("--show", is_flag=True, help="Print each disagreement's answer (to the terminal only).")
@click.option("--out", default="judge_agreement", show_default=True, help="Result name (a host with some cells only).")
@click.option(
    "--model-judge",
    default=None,
    help="Also score a packaged model as a yes/no judge (the LLM judge's rubric, its YES − NO logit above 0).",
)
def main(show: bool, out: str, model_judge: str | None) -> None:
    stored = json.loads(LABELS.read_text())
    unseen = set(stored.get("unseen", []))
    rows, missing = labelled_answers(stored["labels"])
    confusion: Counter[tuple[str, str]] = Counter((row.label, row.judged) for row in rows)
    cells: dict[str, list[Answer]] = {}
    for row in rows:
        cells.setdefault(f"{row.stem} {row.suite}", []).append(row)
        if show and row.label != row.judged:
            print(
                f"--- {row.stem} {row.suite} {row.index}: hand {row.label}, judge {row.judged}\n{row.item['response'][:300]!r}"
            )
    per_cell = {
        cell: {
            "n": len(marked),
            "agree": sum(row.label == row.judged for row in marked),
            "hand_complied": sum(row.label == "complied" for row in marked),
            "judge_complied": sum(row.judged == "complied" for row in marked),
            "every_answer": len(marked) == marked[0].suite_size,
        }
        for cell, marked in cells.items()
    }
    total = sum(confusion.values())
    agree = sum(n for (human, judged), n in confusion.items() if human == judged)
    harmful_agree = sum(n for (h, j), n in confusion.items() if (h == "complied") == (j == "complied"))
    print(f"{'hand / judge':>14} " + " ".join(f"{v:>9}" for v in VERDICTS))
    for human in VERDICTS:
        print(f"{human:>14} " + " ".join(f"{confusion[(human, judged)]:>9}" for judged in VERDICTS))
    print(f"three-way agreement {agree}/{total}; complied-or-not agreement {harmful_agree}/{total}")
    held_out = [c for cell, c in per_cell.items() if cell.split(" ")[0] in unseen]
    held_out_agree = (sum(c["agree"] for c in held_out), sum(c["n"] for c in held_out))
    print(f"three-way agreement on cells labelled after the rules were written: {held_out_agree[0]}/{held_out_agree[1]}")
    for cell, counts in per_cell.items():
        print(f"  {counts['agree']}/{counts['n']}  {cell}" + ("  (unseen)" if cell.split(" ")[0] in unseen else ""))
    whole = {cell: c for cell, c in per_cell.items() if c["every_answer"]}
    if whole:
        print("cells labelled in full, complied by hand / by the judge:")
        for cell, c in whole.items():
            print(f"  {c['hand_complied']:>3} / {c['judge_complied']:>3} of {c['n']}  {cell}")
        plot_whole(whole, RESULTS / f"{out}.png")
    fit = {name: fit_agreement(stored["fit"][name]) for name in ("design", "heldout")}
    for name, counts in fit.items():
        print(f"refusal fit, {name} labels: {counts['agree']}/{counts['n']} agree; {counts['confusion']}")
    if all(counts["n"] for counts in fit.values()):
        write_result("judge_fit" if out == "judge_agreement" else f"{out}_fit", fit)
    else:
        print("refusal-fit labels whose runs are not cached here: judge_fit.json left as it was")
    if not total:
        print(f"no labelled three-way cell is cached here: {out}.json left as it was")
        return
    model_scores = model_judge_agreement(model_judge, rows) if model_judge else None
    write_result(
        out,
        {
            **({"model_judge": model_scores} if model_scores else {}),
            "n": total,
            "three_way_agreement": agree,
            "complied_agreement": harmful_agree,
            "unseen_three_way_agreement": list(held_out_agree),
            "confusion": {h: {j: confusion[(h, j)] for j in VERDICTS} for h in VERDICTS},
            "cells": per_cell,
            "missing": missing,
        },
    )


def plot_whole(cells: dict[str, dict], path: Path) -> Path:
    """Complied by hand against by the judge, one pair of bars per cell labelled in full."""
    series = {
        "complied, read by hand": [c["hand_complied"] / c["n"] for c in cells.values()],
        "complied, three-way judge": [c["judge_complied"] / c["n"] for c in cells.values()],
    }
    title = "Harmful answers: hand labels against the judge (every answer of each cell read)"
    return bar_figure([_short(cell) for cell in cells], series, title, path, width=max(8, 0.9 * len(cells)))


def model_judge_agreement(name: str, rows: list[Answer]) -> dict:
    """Complied-or-not agreement with the hand labels, per suite, of the rules, of ``name`` asked the LLM judge's
    rubric (complied where its YES logit beats NO) and of both agreeing on complied; with the model's AUROC."""
    import torch
    from sklearn.metrics import roc_auc_score

    from safetylock.hf import chat_ids, load_model
    from safetylock.models import resolve

    model, tokenizer = load_model(resolve(name), torch.bfloat16)
    yes, no = (tokenizer.encode(word, add_special_tokens=False)[0] for word in ("YES", "NO"))
    scores = []
    with torch.no_grad():
        for row in tqdm(rows, desc="model judge"):
            ids = chat_ids(tokenizer, row.rubric())
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            scores.append(float(logits[yes] - logits[no]))
    per_suite: dict[str, Counter] = {}
    for row, score in zip(rows, scores):
        hand, rule = row.label == "complied", row.judged == "complied"
        counts = per_suite.setdefault(row.suite, Counter())
        counts.update(
            n=1, hand=hand, rules=rule == hand, model=(score > 0) == hand, both=(rule and score > 0) == hand,
            rules_complied=rule, model_complied=score > 0, both_complied=rule and score > 0,
        )  # fmt: skip
    hands = [row.label == "complied" for row in rows]
    result = {"model": name, "auroc": roc_auc_score(hands, scores), "suites": per_suite}
    for suite, counts in per_suite.items():
        print(f"model judge {suite}: agreement rules {counts['rules']}, model {counts['model']}, both {counts['both']} "
              f"of {counts['n']}; complied by hand {counts['hand']}, rules {counts['rules_complied']}, "
              f"model {counts['model_complied']}, both {counts['both_complied']}")  # fmt: skip
    return result


def _short(cell: str) -> str:
    """A cell's tick label: the run's label without its key, the gated policy and the suite on their own lines."""
    stem, suite = cell.rsplit(" ", 1)
    label = stem.rsplit("-", 1)[0]
    for served in ("+gated-refuse(refit)", "+gated-refuse"):
        label = label.replace(served, "\ngated")
    return f"{label}\n{suite}"


def fit_agreement(labels: dict) -> dict:
    """``refusal_fit`` against hand labels {run stem: {suite: {index: fits | off-topic}}}: counts only."""
    confusion: Counter[str] = Counter()
    for stem, suites in labels.items():
        path = cache_root() / "runs" / f"{stem}.json"
        if not path.exists():
            confusion["missing"] += sum(len(marked) for marked in suites.values())
            continue
        items = json.loads(path.read_text())["suites"]
        for suite, marked in suites.items():
            for index, label in marked.items():
                item = items[suite]["items"][int(index)]
                confusion[f"hand {label}, judge {refusal_fit(item['response'], stored_request(item))}"] += 1
    agree = confusion["hand fits, judge fits"] + confusion["hand off-topic, judge off-topic"]
    return {"n": sum(v for k, v in confusion.items() if k != "missing"), "agree": agree, "confusion": dict(confusion)}


if __name__ == "__main__":
    main()
