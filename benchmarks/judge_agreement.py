"""How often the three-way judge agrees with hand labels of cached evaluation answers.

Run: python -m benchmarks.judge_agreement [--out judge_agreement]
Reads benchmarks/judge_labels.json (run stem, suite, item index, label; no text) and the cached runs under
~/.cache/safetylock/runs; writes benchmarks/results/judge_agreement.json (counts only). Cells whose run is not
cached are listed as missing. Also scores ``judge.refusal_fit`` against the hand labels of refusals (``fit``:
the set read while the rule was written, and a held-out set labelled after): benchmarks/results/judge_fit.json.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from benchmarks.common import write_result
from safetylock.evaluate import stored_request
from safetylock.judge import VERDICTS, refusal_fit, verdict
from safetylock.models import cache_root

LABELS = Path(__file__).with_name("judge_labels.json")


@click.command()
@click.option("--show", is_flag=True, help="Print each disagreement's answer (to the terminal only).")
@click.option("--out", default="judge_agreement", show_default=True, help="Result name (a host with some cells only).")
def main(show: bool, out: str) -> None:
    stored = json.loads(LABELS.read_text())
    labels, unseen = stored["labels"], set(stored.get("unseen", []))
    confusion: Counter[tuple[str, str]] = Counter()
    per_cell, missing = {}, []
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
            if show:
                for (i, label), (_, judged) in zip(marked.items(), pairs):
                    if label != judged:
                        print(f"--- {stem} {suite} {i}: hand {label}, judge {judged}\n{items[int(i)]['response'][:300]!r}")
            per_cell[f"{stem} {suite}"] = {"n": len(pairs), "agree": sum(h == j for h, j in pairs)}
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
    write_result(
        out,
        {
            "n": total,
            "three_way_agreement": agree,
            "complied_agreement": harmful_agree,
            "unseen_three_way_agreement": list(held_out_agree),
            "confusion": {h: {j: confusion[(h, j)] for j in VERDICTS} for h in VERDICTS},
            "cells": per_cell,
            "missing": missing,
        },
    )


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
