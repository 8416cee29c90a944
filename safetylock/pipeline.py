"""End-to-end extraction of a Meta-SafetyLock from an aligned base model, and HF generation."""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Sequence
from dataclasses import dataclass

from safetylock import data
from safetylock.alpha import DEFAULT_ALPHA
from safetylock.capture import capture
from safetylock.errors import ExtractError
from safetylock.gate import DEFAULT_READ, candidate_layers, check_read, fit_gate
from safetylock.geometry import head_geometry, output_projections, projection_fingerprint
from safetylock.hf import forward_precision
from safetylock.lockfile import SafetyLock, from_probes
from safetylock.overlap import fingerprints
from safetylock.probe import check_top_k, fit_probes
from safetylock.provenance import SKETCH_SEED, hf_weight_sketch
from safetylock.recipes import contrast_examples, recipe
from safetylock.sources import DEFAULT_GATE_DATA, GATE_DATA, Request, Sizes, gate_requests


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines a lock besides the model: the same config gives the same lock."""

    top_k: int = 24
    recipe: str = "templates"  # probe contrast data: see safetylock.recipes
    tokens: int = 5
    questions: int | None = 128  # extraction questions used (None: the whole extraction split)
    seed: int = 0
    validation_fraction: float = 0.2
    default_alpha: float = DEFAULT_ALPHA
    batch_size: int = 16
    gate: bool = True  # also fit the request gate (safetylock.gate) for gated serving, the product's default
    precision: str = "auto"  # of the head capture's and the gate's forwards (safetylock.hf.forward_precision)
    gate_data: Sizes = GATE_DATA[DEFAULT_GATE_DATA]  # how many requests of each source the gate is fit on
    gate_read: str = DEFAULT_READ  # what the gate reads (safetylock.gate.READS)


class Stopwatch:
    """Wall seconds between ``lap`` calls, written into ``into`` under each lap's name (nothing when ``None``)."""

    def __init__(self, into: dict[str, float] | None) -> None:
        self.into, self.last = into, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if self.into is not None:
            self.into[name] = round(now - self.last, 1)
        self.last = now


def extract_lock(
    model,
    tokenizer,
    harmful: data.PromptSet,
    config: ExtractConfig = ExtractConfig(),
    progress: bool = True,
    stages: dict[str, float] | None = None,
    operator: Sequence[Request] = (),
) -> SafetyLock:
    """Capture → probe → lock on the extraction split of ``harmful`` (and the gate, fit with the ``operator``'s own
    requests too when given); ``stages``, when given, receives each stage's wall seconds."""
    if operator and not config.gate:
        raise ExtractError("operator gate requests need the gate: extract without --no-gate")
    clock = Stopwatch(stages)
    geometry = head_geometry(model.config)
    check_top_k(geometry, config.top_k)  # before the minutes of capture, not after
    precision = forward_precision(config.precision)  # likewise
    check_read(config.gate_read)  # likewise
    requests = gate_requests(harmful, config.gate_data, seed=config.seed, operator=operator) if config.gate else ()
    clock.lap("gate requests")  # built first: a bad operator file fails before the minutes of capture
    split = data.split_harmful(harmful, seed=config.seed)
    questions = data.sample(split.extraction, config.questions, config.seed)
    skip = recipe(config.recipe).skip
    examples = contrast_examples(config.recipe, model, tokenizer, questions, config.tokens, config.seed, progress)
    clock.lap("contrast examples")
    acts = capture(
        model, tokenizer, examples, config.tokens, config.batch_size, progress=progress, skip=skip, precision=precision
    )
    clock.lap("head capture")
    result = fit_probes(
        acts, top_k=config.top_k, validation_fraction=config.validation_fraction, seed=config.seed, progress=progress
    )
    clock.lap("head probes")
    projections = output_projections(model, geometry)
    gate = None
    if config.gate:
        layers = candidate_layers(geometry.num_layers)
        gate, _ = fit_gate(
            model, tokenizer, requests, layers, config.seed, progress, precision, config.gate_data, operator, config.gate_read
        )
        clock.lap("gate")
    try:
        version = importlib.metadata.version("safetylock")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return from_probes(
        result,
        geometry,
        default_alpha=config.default_alpha,
        architecture={
            "model_type": getattr(model.config, "model_type", ""),
            "architectures": list(getattr(model.config, "architectures", None) or []),
        },
        base_fingerprint=projection_fingerprint(projections),
        base_sketch=hf_weight_sketch(projections, geometry, SKETCH_SEED),
        sketch_seed=SKETCH_SEED,
        token_policy={
            "recipe": config.recipe,
            "record": "last_response_tokens" if not skip else "response_tokens_before_last",
            "tokens": config.tokens,
            **({"skip": skip} if skip else {}),
            "apply": "every_position",
        },
        provenance={
            "harmful": harmful.provenance(),
            "split": {"seed": config.seed, "heldout_fraction": 0.5, "extraction_used": len(questions)},
            "fit_prompts": fingerprints(questions),  # the probes' questions (safetylock.overlap)
            "examples": {"safe": sum(e.safe for e in examples), "unsafe": sum(1 - e.safe for e in examples)},
            "probe": {
                "classifier": "sklearn LogisticRegression",
                "validation_fraction": config.validation_fraction,
                "train_examples": int(len(result.split.train)),
                "validation_examples": int(len(result.split.validation)),
                "ranking": "validation accuracy, then validation log-loss",
            },
            "seed": config.seed,
            "precision": precision,  # of the forwards (the head capture's and the gate's)
            "safetylock_version": version,
        },
        gate=gate,
    )
