"""What a fit saw, and the rule that no evaluation suite is scored with a fit that saw its prompts.

Three fits see prompts: a lock's probes (harmful extraction questions), its gate (requests from several
sources, ``safetylock.sources``) and an NLSR repair (refusals to extraction questions). Each is described by a
``Fit``: the sources it drew from and the fingerprints of its prompts (``fingerprint``: the casefolded,
whitespace-collapsed text of the request's last user turn). New locks and NLSR reports record the
fingerprints; for locks written before that, they are rebuilt from what the lock records (the packaged data's
digest, the split seed, each gate source's hash) and kept only where the rebuilt data hash the same.

The rule (``check``): a suite that shares any prompt with a fit is refused (``OverlapError``); a suite whose
prompts are disjoint from the fit but come from a source the fit also drew from (e.g. AdvBench's held-out
split against a gate fit on its extraction split) is scored and labelled *in-distribution*.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from safetylock.errors import DataError


class OverlapError(DataError):
    """An evaluation suite shares prompts with the data a lock, gate or repair was fit on."""


def normalize(text: str) -> str:
    """``text`` casefolded with whitespace collapsed: how fits and hold-outs compare texts."""
    return " ".join(text.split()).casefold()


def fingerprint(text: str) -> str:
    """12 hex of sha256 over ``normalize(text)``: how fits record their prompts."""
    return hashlib.sha256(normalize(text).encode()).hexdigest()[:12]


def containing(texts: Sequence[str], needles: Iterable[str]) -> list[bool]:
    """Per text: whether it contains one of ``needles`` (a chat's last turn, a wrapper around one), both normalized."""
    wanted = {normalize(n) for n in needles}
    return [any(n in text for n in wanted) for text in map(normalize, texts)]


def fingerprints(texts: Iterable[str]) -> list[str]:
    return sorted({fingerprint(t) for t in texts})


@dataclass(frozen=True)
class Fit:
    """One fit's data: ``what`` it is, the sources it drew from, its prompts' fingerprints (None: not known)."""

    what: str
    sources: frozenset[str]
    prompts: frozenset[str] | None


def _probe_fit(lock) -> Fit:
    from safetylock import data

    recorded = lock.provenance.get("fit_prompts")
    if recorded is None:  # older locks: rebuild the extraction questions where the packaged data hash the same
        split, harmful = lock.provenance.get("split", {}), lock.provenance.get("harmful", {})
        bench = data.advbench() if harmful.get("name") == "advbench" else None
        if bench is not None and bench.sha256 == harmful.get("sha256") and "extraction_used" in split:
            part = data.split_harmful(bench, seed=split.get("seed", 0)).extraction
            recorded = fingerprints(data.sample(part, split["extraction_used"], lock.seed))
    return Fit(f"probes of lock {lock.fingerprint}", frozenset({"advbench"}), None if recorded is None else frozenset(recorded))


def _gate_fit(lock) -> Fit:
    calibration = lock.gate.calibration
    sources = dict(calibration.get("data", {}))
    recorded = calibration.get("fit_prompts")
    if recorded is None and sources:  # older locks: the packaged requests of every source whose hash matches
        from safetylock import data
        from safetylock.sources import source_hashes

        requests = lock.gate_requests(data.advbench())
        rebuilt = source_hashes(requests)
        if all(rebuilt.get(source) == digest for source, digest in sources.items()):
            recorded = fingerprints(r.text for r in requests if r.source in sources)
    prompts = None if recorded is None else frozenset(recorded)
    return Fit(f"gate of lock {lock.fingerprint}", frozenset(sources), prompts)


def lock_fits(lock) -> list[Fit]:
    """The fits behind a lock: its probes, and its gate where it has one."""
    return [_probe_fit(lock)] + ([_gate_fit(lock)] if lock.gate is not None else [])


def nlsr_fit(report: dict[str, Any]) -> Fit:
    """The fit behind an NLSR repair, from its ``nlsr_report.json``."""
    recorded = report.get("fit_prompts")
    sources = frozenset(report.get("fit_sources", ["advbench"]))
    return Fit("NLSR safety data", sources, None if recorded is None else frozenset(recorded))


def check(suite: str, prompts: Sequence[str], sources: Iterable[str], fits: Sequence[Fit]) -> dict[str, list[str]]:
    """Refuse ``suite`` if it shares a prompt with a fit; else ``{fit: shared sources}`` (in-distribution labels)
    and ``{fit: []}`` for fits whose prompts are unknown under ``"unverified"``."""
    mine = {fingerprint(p) for p in prompts}
    labels: dict[str, list[str]] = {}
    for fit in fits:
        if fit.prompts is None:
            labels.setdefault("unverified", []).append(fit.what)
            continue
        shared = mine & fit.prompts
        if shared:
            raise OverlapError(
                f"suite {suite!r} shares {len(shared)} of its {len(mine)} prompts with the {fit.what} "
                f"(sources {', '.join(sorted(fit.sources)) or 'unknown'}): score it with a fit that never saw them"
            )
        common = sorted(set(sources) & fit.sources)
        if common:
            labels[fit.what] = common
    return labels
