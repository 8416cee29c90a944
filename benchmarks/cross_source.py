"""Each method's efficacy with a cross-source column: the always-on lock, the gated lock (refuse, the default) and
NLSR, on AdvBench's held-out half (in-distribution: the lock's probes and gate, and NLSR's safety data, are fit on
the other half) and on PyRIT's AI-red-team objectives (``airt``: a source none of them is fit on; checked by
``safetylock.overlap`` in every run), with benign over-refusal and arithmetic.

Same sizes and suites as ``benchmarks.responses`` (its cached runs are reused: the unlocked and gated rows),
plus per variant the always-on product lock at ``--alpha``, and NLSR in its own setting (``downstream`` realigned
at the paper's default from ``aligned-mixed``, as ``benchmarks.nlsr`` builds it) alone and with the gated lock,
realigned on safety data drawn from every source of the gate's harmful requests (``--safety-data mixed``), and at
``benchmarks.nlsr``'s stronger setting.

``--suites jailbreak,multiturn`` asks AdvBench's held-out requests in the forms the gate is fit on (jailbreak
templates, a conversation's second turn) but the probes and NLSR never saw: the overlap rule labels them
in-distribution for the gated lock (its fit drew from those sources), and they show what the form alone does to
the always-on lock and NLSR.

``--alpha-off A`` adds, per attacked variant, the gated lock with α A on the requests its gate does not fire on
(the fired ones still get the refusal): the always-on lock's reach under the gate's refusals.

Run: python -m benchmarks.cross_source [--variants harmful-10,harmful-10-full] [--nlsr/--no-nlsr] [--suites A,B]
Writes benchmarks/results/cross_source.{json,png} (summaries, one table per method; answers stay in the cache).
"""

from __future__ import annotations

import click

from benchmarks.common import RESULTS, calibrated_lock, gate_data_option, write_result
from benchmarks.responses import SUITES, lock_tags, product_lock
from safetylock.attack import BASE, build, served
from safetylock.evaluate import cached_run, without_items
from safetylock.gate import DEFAULT_READ, READS
from safetylock.hf import Framing
from safetylock.report import aligned_text, comparison_plot, comparison_rows

NLSR_DEFAULT = (0.5, 0.8)  # PRUNE_RATE, SPARSITY: the paper's default (benchmarks.nlsr's first setting)
NLSR_STRONG = (0.9, 0.5)  # benchmarks.nlsr's second setting: more modules patched, denser masks


@click.command()
@click.option("--variants", default="harmful-10,harmful-100,harmful-10-full,identity-shift,benign", show_default=True)
@click.option("--alpha", type=float, default=2.0, show_default=True, help="α of the always-on lock.")
@click.option("--count", type=int, default=50, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--nlsr/--no-nlsr", default=True, show_default=True, help="Add NLSR's rows (builds its variants).")
@click.option("--always-on/--no-always-on", default=True, show_default=True, help="Add the always-on lock's rows.")
@click.option(
    "--refit/--threshold-only",
    default=False,
    show_default=True,
    help="Calibrate each variant's gate as `calibrate-gate` does by default (weights refit on the variant) instead "
    "of re-setting its threshold alone (what the first tables measured).",
)
@click.option(
    "--suites",
    default=",".join(SUITES),
    show_default=True,
    help="Comma list of eval suites (e.g. past-tense,donotanswer,advice: more sources no lock here is fit on; "
    "jailbreak,multiturn: AdvBench's held-out requests inside jailbreak templates or after a benign turn).",
)
@click.option(
    "--alpha-off",
    type=float,
    default=0.0,
    show_default=True,
    help="Also serve each attacked variant gated with this α on the requests whose gate does not fire (0: no such "
    "row); the fired ones still get the refusal.",
)
@gate_data_option(
    "The data the gate is fit on (`extract --gate-data`): its rows are labelled with the name unless the default."
)
@click.option(
    "--gate-read",
    type=click.Choice(READS),
    default=DEFAULT_READ,
    show_default=True,
    help="What the gate reads (`extract --gate-read`): its rows are labelled with the read unless the default.",
)
@click.option("--out", default="cross_source", show_default=True)
def main(
    variants: str,
    alpha: float,
    count: int,
    max_tokens: int,
    nlsr: bool,
    always_on: bool,
    refit: bool,
    suites: str,
    alpha_off: float,
    gate_data: str,
    gate_read: str,
    out: str,
) -> None:
    from benchmarks.nlsr import realigned

    lock = product_lock(gate_data=gate_data, read=gate_read)
    data_tag = "".join(f"[{tag}]" for tag in lock_tags(gate_data, gate_read))
    chosen = tuple(s for s in suites.split(",") if s)
    sizes = {"count": count, "max_tokens": max_tokens, "enforce_eager": True, "suites": chosen}
    tables: dict[str, list[dict]] = {"always-on lock": [], "gated lock (refuse)": [], "NLSR": []}
    base = cached_run(BASE, "aligned-base", framing=Framing(), **sizes)
    for name in ["aligned-base", *[v for v in variants.split(",") if v]]:
        model, framing = (BASE, Framing()) if name == "aligned-base" else served(name)
        unlocked = base if name == "aligned-base" else cached_run(model, name, framing=framing, **sizes)
        if always_on:
            always = cached_run(model, f"{name}+lock(a={alpha:g})", lock=lock, alpha=alpha, framing=framing, **sizes)
            tables["always-on lock"] += [unlocked, always]
        served_lock = lock if name == "aligned-base" else calibrated_lock(lock, name, model, framing, refit)
        gated = {"lock": served_lock, "alpha": 4.0, "gated": True, "framing": framing}
        label = f"{name}+gated{data_tag}-refuse{'(refit)' if refit and name != 'aligned-base' else ''}"
        tables["gated lock (refuse)"] += [unlocked, cached_run(model, label, **gated, response="refuse", **sizes)]
        if alpha_off and name != "aligned-base":
            label_off = f"{label}+alpha-off({alpha_off:g})"
            off = cached_run(model, label_off, **gated, response="refuse", alpha_off=alpha_off, **sizes)
            tables["gated lock (refuse)"].append(off)
    if nlsr:
        aligned = build("aligned-mixed")
        finetuned = str(build("downstream") / "merged")
        label = f"downstream+NLSR(p={NLSR_DEFAULT[0]:g},s={NLSR_DEFAULT[1]:g})"
        refitted = "(refit)" if refit else ""
        gated = {"lock": calibrated_lock(lock, "downstream", finetuned, Framing(), refit), "alpha": 4.0, "gated": True}
        tables["NLSR"] = [
            base,
            cached_run(str(aligned / "merged"), "aligned-mixed", **sizes),
            cached_run(finetuned, "downstream", **sizes),
            cached_run(finetuned, f"downstream+gated{data_tag}-refuse{refitted}", **gated, response="refuse", **sizes),
        ]
        # NLSR's safety data: AdvBench, or every source of the gate's; and the stronger setting on AdvBench's
        for setting, safety_data in ((NLSR_DEFAULT, "advbench"), (NLSR_DEFAULT, "mixed"), (NLSR_STRONG, "advbench")):
            repaired, _ = realigned("downstream", aligned / "adapter", *setting, seed=0, safety_data=safety_data)
            name = f"downstream+NLSR(p={setting[0]:g},s={setting[1]:g})"
            name += "+mixed-safety-data" if safety_data == "mixed" else ""
            tables["NLSR"].append(cached_run(str(repaired), name, **sizes))
            if name == label:
                gated_name = f"{name}+gated{data_tag}-refuse{refitted}"
                tables["NLSR"].append(cached_run(str(repaired), gated_name, **gated, response="refuse", **sizes))
    written = {}
    for method, runs in tables.items():
        if not runs:
            continue
        header, rows = comparison_rows(runs)
        print(f"\n{method}\n{aligned_text(header, rows)}")
        written[method] = {"header": header, "rows": rows, "runs": [without_items(r) for r in runs]}
    write_result(
        out,
        {
            "protocol": "vLLM + plugin, greedy, enforce-eager; lock: heads + gate fit on every source of the "
            f"{gate_data} gate data, gate {'refit' if refit else 'threshold re-set'} on each variant as served; "
            "every suite but advbench-heldout is from a source no lock, gate or NLSR run here is fit on (checked in "
            "each run)",
            "suites": list(chosen),
            "gate_calibration": "refit" if refit else "threshold",
            "alpha_always_on": alpha,
            "alpha_off": alpha_off,
            "gate_data": gate_data,
            "gate_read": gate_read,
            "count": count,
            "max_tokens": max_tokens,
            "tables": written,
        },
    )
    shown = {r["target"]["label"]: r for runs in tables.values() for r in runs}  # the unlocked rows appear per method
    comparison_plot(list(shown.values()), RESULTS / f"{out}.png")


if __name__ == "__main__":
    main()
