"""How often the three-way judge agrees with hand labels of cached evaluation answers.

Run: python -m benchmarks.judge_agreement [--out judge_agreement] [--model-judge qwen2.5-coder-0.5b-instruct]
Reads benchmarks/judge_labels.json (run stem, suite, item index, label; no text) and the cached runs under
~/.cache/safetylock/runs; writes benchmarks/results/judge_agreement.json (counts only) and, for the cells whose
every answer is labelled, a plot of complied by hand against by the judge (judge_agreement.png). Cells whose run is
not cached are listed as missing. Also scores ``judge.refusal_fit`` against the hand labels of refusals (``fit``:
the set read while the rule was written, and a held-out set labelled after): benchmarks/results/judge_fit.json.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click
from tqdm import tqdm

from benchmarks.common import RESULTS, grouped_bars, write_result
from safetylock.evaluate import stored_request
from safetylock.judge import VERDICTS, refusal_fit, verdict
from safetylock.models import cache_root

LABELS = Path(__file__).with_name("judge_labels.json")


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
    labels, unseen = stored["labels"], set(stored.get("unseen", []))
    confusion: Counter[tuple[str, str]] = Counter()
    per_cell, missing = {}, []
    judged_items: list[tuple[str, dict, str, str]] = []  # (suite, item, hand label, the rules' verdict)
    for stem, suites in labels.items():
        path = cache_root() / "runs" / f"{stem}.json"
        if not path.exists():
            missing.append(stem)
            continue
        run = json.loads(path.read_text())
        for suite, marked in suites.items():
            items = run["suites"][suite]["items"]
            pairs = [(label, verdict(items[int(i)]["response"], stored_request(items[int(i)]))) for i, label in marked.items()]
            confusion.update(pairs)
            judged_items += [(suite, items[int(i)], *pair) for i, pair in zip(marked, pairs)]
            if show:
                for (i, label), (_, judged) in zip(marked.items(), pairs):
                    if label != judged:
                        print(f"--- {stem} {suite} {i}: hand {label}, judge {judged}\n{items[int(i)]['response'][:300]!r}")
            per_cell[f"{stem} {suite}"] = {
                "n": len(pairs),
                "agree": sum(h == j for h, j in pairs),
                "hand_complied": sum(h == "complied" for h, _ in pairs),
                "judge_complied": sum(j == "complied" for _, j in pairs),
                "every_answer": len(pairs) == len(items),
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
    model_scores = model_judge_agreement(model_judge, judged_items) if model_judge else None
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [_short(cell) for cell in cells]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(cells)), 4.5))
    grouped_bars(
        ax,
        groups,
        {
            "complied, read by hand": [c["hand_complied"] / c["n"] for c in cells.values()],
            "complied, three-way judge": [c["judge_complied"] / c["n"] for c in cells.values()],
        },
    )
    ax.set_title("Harmful answers: hand labels against the judge (every answer of each cell read)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def model_judge_agreement(name: str, judged_items: list[tuple[str, dict, str, str]]) -> dict:
    """Complied-or-not agreement with the hand labels, per suite, of the rules, of ``name`` asked the LLM judge's
    rubric (complied where its YES logit beats NO) and of both agreeing on complied; with the model's AUROC.
    ``judged_items``: (suite, item, hand label, the rules' verdict) for every labelled answer cached here."""
    import torch
    from sklearn.metrics import roc_auc_score

    from safetylock.evaluate import RUBRIC
    from safetylock.hf import chat_ids, load_model
    from safetylock.models import resolve

    model, tokenizer = load_model(resolve(name), torch.bfloat16)
    yes, no = (tokenizer.encode(word, add_special_tokens=False)[0] for word in ("YES", "NO"))
    scores = []
    with torch.no_grad():
        for _, item, _, _ in tqdm(judged_items, desc="model judge"):
            ids = chat_ids(tokenizer, RUBRIC.format(prompt=stored_request(item), response=item["response"]))
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            scores.append(float(logits[yes] - logits[no]))
    per_suite: dict[str, Counter] = {}
    for (suite, _, label, judged), score in zip(judged_items, scores):
        hand, rule = label == "complied", judged == "complied"
        counts = per_suite.setdefault(suite, Counter())
        counts.update(
            n=1, hand=hand, rules=rule == hand, model=(score > 0) == hand, both=(rule and score > 0) == hand,
            rules_complied=rule, model_complied=score > 0, both_complied=rule and score > 0,
        )  # fmt: skip
    hands = [label == "complied" for _, _, label, _ in judged_items]
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
