"""A soak of a locked OpenAI server: ramped concurrent traffic, faults and hot swaps, and what it served, checked.

``soak(plan, target)`` starts the server (gated lock, per-request α allowed under a policy, hot swap on), ramps
concurrency to ``plan.max_concurrency`` with harmful and benign chat requests of mixed lengths (streamed or not,
some with their own α, some pre-filling the assistant turn), disconnects some streams mid-answer, interleaves
malformed requests, swaps the α and the lock in turn every ``plan.swap_every_s`` seconds, and samples the
server's memory and metrics. ``recheck`` replays a sample of the completed requests in the HF model with the lock
and α they were served under (``recheckable``: the epoch between two swaps they ran in; under refuse, each lock in
force while they ran): each served token must be the HF gated model's greedy choice. Every request is greedy, so
that check applies to all of them.

What the soak reports (``SoakResult.summary``): requests by outcome, 4xx by cause (every one expected, none on a
well-formed request), 5xx and transport failures (must be 0), whether the server or its engine processes changed
(restarts: must be 0), latency and memory over time, and the gate's decision count against the requests that
reached the engine (each decided once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetylock.serve.config import ENV_ADMIN_TOKEN, lock_section
from safetylock.serve.server import free_port, start_server, stop_server, wait_healthy

ADMIN_TOKEN = "soak-admin-token"
MALFORMED = (
    "alpha-above-max",  # vllm_xargs.safetylock_alpha beyond the policy: 400
    "alpha-nan",  # NaN: 400
    "alpha-string",  # "strong": 400
    "huge-max-tokens",  # max_tokens far beyond the context: 400
    "invalid-json",  # a body cut in the middle: 400
    "unknown-adapter",  # a model name the server does not serve: 404
    "prompt-too-long",  # more tokens than the model length: 400
)


@dataclass(frozen=True)
class SoakPlan:
    """How long, how hard and how faulty the traffic is."""

    duration_s: float = 900.0
    max_concurrency: int = 64
    ramp_s: float = 120.0  # concurrency grows linearly from 1 to max_concurrency over this long
    swap_every_s: float = 30.0  # α and lock swapped in turn
    stream_share: float = 0.4
    disconnect_share: float = 0.1  # streams the client drops after a few chunks
    malformed_share: float = 0.1
    prefill_share: float = 0.05  # chat requests continuing a pre-filled assistant turn
    alpha_share: float = 0.2  # requests that set their own α (within the policy)
    long_share: float = 0.2  # prompts padded with context up to the model length
    max_tokens: int = 64
    sample_every_s: float = 2.0
    recheck: int = 24  # completed requests replayed in the HF model
    seed: int = 0

    def __post_init__(self) -> None:
        shares = (self.stream_share, self.disconnect_share, self.malformed_share, self.prefill_share)
        if any(not 0 <= s <= 1 for s in (*shares, self.alpha_share, self.long_share)) or sum(shares) > 1:
            raise ValueError("soak shares must lie in [0, 1] and the request kinds' shares sum to at most 1")
        if self.duration_s <= 0 or self.max_concurrency < 1 or self.max_tokens < 1:
            raise ValueError("soak duration, concurrency and max_tokens must be positive")


@dataclass(frozen=True)
class SoakTarget:
    """What is served: the model, two gated locks swapped in turn with two default α values, the policy's upper
    bound on request α, the engine's arguments and the gate's response (None: the server's default)."""

    model_dir: Path
    locks: tuple[Path, Path]
    alphas: tuple[float, float]
    max_alpha: float
    max_model_len: int
    engine_args: tuple[str, ...] = ()
    response: str | None = None
    allow_prefill: bool = False

    def section(self) -> dict[str, Any]:
        options = {"gated": True, "allow_request_alpha": True, "max_alpha": self.max_alpha, "response": self.response}
        return lock_section(self.locks[0], self.alphas[0], allow_prefill=self.allow_prefill, **options)

    @property
    def refused_kinds(self) -> tuple[str, ...]:
        """The request kinds the server must answer with 4xx."""
        return MALFORMED if self.allow_prefill else (*MALFORMED, "prefill")


@dataclass
class Record:
    """One request as the client saw it."""

    kind: str
    start: float
    end: float = math.nan
    status: int | str = 0  # HTTP status, or the transport error's name
    message: str = ""  # the error message of a refused request
    alpha: float | None = None  # the α the request asked for (None: the server's)
    harmful: bool = False
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    chunks: int = 0
    disconnected: bool = False

    @property
    def completed(self) -> bool:
        """Answered to the end (HTTP 200, not dropped by its client)."""
        return self.status == 200 and not self.disconnected

    @property
    def reached_engine(self) -> bool:
        """Whether the engine prefilled it: answered, or dropped by the client after its first chunk (which
        carries the prompt's tokens and comes after the prefill)."""
        return self.status == 200 and bool(self.prompt_ids)


@dataclass(frozen=True)
class Epoch:
    """The lock and default α served between two swaps (``start`` .. ``end``, seconds since the soak began)."""

    start: float
    end: float
    lock: int  # index into SoakTarget.locks
    alpha: float


@dataclass
class Sample:
    """The server's state at one moment."""

    t: float
    active: int
    completed: int
    rss_mb: float
    kv_cache_usage: float
    running: float
    waiting: float
    preemptions: float
    gate_decisions: float
    gate_fired: float
    rss_by_process: dict[str, float] = field(default_factory=dict)


@dataclass
class SoakResult:
    plan: SoakPlan
    records: list[Record]
    epochs: list[Epoch]
    swaps: list[dict[str, Any]]
    samples: list[Sample]
    server_exit: int | None  # the server's exit code if it stopped during the soak (must be None)
    engine_pids_changed: bool
    metrics_end: dict[str, float]
    refusal_message: str | None = None  # the refuse response's text (None: steer): answers that are it are counted
    refused_kinds: tuple[str, ...] = MALFORMED  # kinds the server must answer with 4xx (SoakTarget.refused_kinds)
    rechecks: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        records = self.records
        statuses = Counter(str(r.status) for r in records)
        refused = self.refused_kinds
        expected_4xx = Counter(r.kind for r in records if r.kind in refused and _is_4xx(r.status))
        unexpected = [r for r in records if r.kind not in refused and r.status != 200]
        malformed_served = [r for r in records if r.kind in refused and not _is_4xx(r.status)]
        reached = sum(r.reached_engine for r in records)
        decided = self.metrics_end.get("safetylock_gate_decisions_total", math.nan)
        completed = [r for r in records if r.completed]
        return {
            "requests": len(records),
            "by_kind": dict(Counter(r.kind for r in records)),
            "by_status": dict(statuses),
            "served": len(completed),
            "disconnected": sum(r.disconnected for r in records),
            "4xx_by_cause": dict(expected_4xx),
            "refusable_not_refused": len(malformed_served),
            "unexpected_failures": len(unexpected),
            "unexpected_examples": [f"{r.kind}: {r.status} {r.message[:120]}" for r in unexpected[:5]],
            "5xx": sum(isinstance(r.status, int) and r.status >= 500 for r in records),
            "transport_errors": sum(isinstance(r.status, str) for r in records),
            "server_exit": self.server_exit,
            "restarts": int(self.server_exit is not None or self.engine_pids_changed),
            "swaps": len(self.swaps),
            "swaps_failed": sum(s["status"] != 200 for s in self.swaps),
            "gate_decisions": decided,
            "requests_reaching_engine": reached,
            "each_request_decided_once": decided == reached,
            "gate_fired": self.metrics_end.get("safetylock_gate_fired_total", math.nan),
            "latency_s": _quantiles([r.end - r.start for r in completed]),
            "rss_mb": _memory(self.samples, "rss_mb"),
            "kv_cache_usage": _memory(self.samples, "kv_cache_usage"),
            "refused_by_kind": self.refused_by_kind(),
            "rechecked": len(self.rechecks),
            "rechecked_equal": sum(c["equal"] for c in self.rechecks),
            "rechecked_fired": sum(bool(c["fired"]) for c in self.rechecks),
        }

    def is_refusal(self, record: Record) -> bool | None:
        """Whether ``record``'s answer is the refusal message (None under steer, which has none)."""
        return None if self.refusal_message is None else record.text.strip() == self.refusal_message

    def refused_by_kind(self) -> dict[str, dict[str, float]]:
        """Under refuse: of the completed answers of each well-formed kind, harmful and benign, the share that is
        the refusal message (a pre-filled assistant turn that slips past the gate shows here)."""
        if self.refusal_message is None:
            return {}
        out: dict[str, dict[str, float]] = {}
        for kind in ("chat", "stream", "prefill"):
            for harmful in (True, False):
                done = [r for r in self.records if r.kind == kind and r.harmful == harmful and r.completed]
                done = [r for r in done if r.finish is not None]
                if done:
                    refused = sum(self.is_refusal(r) for r in done)
                    out.setdefault(kind, {})["harmful" if harmful else "benign"] = round(refused / len(done), 4)
        return out

    def latency_windows(self, windows: int = 20) -> list[dict[str, float]]:
        """p50/p99 latency of the requests completed in each of ``windows`` equal spans of the soak."""
        width = self.plan.duration_s / windows
        out = []
        for index in range(windows):
            ends = [r.end - r.start for r in self.records if r.completed and index * width <= r.end < (index + 1) * width]
            out.append({"t": (index + 0.5) * width, "count": len(ends), **_quantiles(ends)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "summary": self.summary(),
            "latency_windows": self.latency_windows(),
            "samples": [asdict(s) for s in self.samples],
            "epochs": [asdict(e) for e in self.epochs],
            "swaps": self.swaps,
            "rechecks": self.rechecks,
            "records": [
                {
                    "kind": r.kind,
                    "harmful": r.harmful,
                    "start": round(r.start, 3),
                    "end": round(r.end, 3),
                    "status": r.status,
                    "alpha": r.alpha,
                    "prompt_tokens": len(r.prompt_ids),
                    "output_tokens": len(r.output_ids),
                    "disconnected": r.disconnected,
                    "refused": self.is_refusal(r),
                }
                for r in self.records
            ],
        }


def _is_4xx(status: int | str) -> bool:
    return isinstance(status, int) and 400 <= status < 500


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p99": math.nan}
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def _memory(samples: Sequence[Sample], name: str) -> dict[str, float]:
    """The value after warm-up (a quarter into the soak), at the end, and the largest."""
    if not samples:
        return {}
    values = [getattr(s, name) for s in samples]
    warm = values[len(values) // 4]
    return {"after_warm_up": warm, "end": values[-1], "max": max(values)}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {series without labels: summed value} for the series the soak watches."""
    wanted = (
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:num_preemptions_total",
        "safetylock_gate_decisions_total",
        "safetylock_gate_fired_total",
    )
    values: dict[str, float] = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            with contextlib.suppress(ValueError):
                values[name] += float(line.rsplit(" ", 1)[1])
    return values


@dataclass(frozen=True)
class Prompts:
    """The soak's chat prompts, harmful and benign, and filler text to pad some of them to the model length."""

    harmful: tuple[str, ...]
    benign: tuple[str, ...]
    filler: tuple[str, ...]


class Traffic:
    """Builds each request body from a seeded generator (one per client)."""

    def __init__(self, plan: SoakPlan, target: SoakTarget, prompts: Prompts, tokenizer) -> None:
        self.plan, self.target, self.prompts, self.tokenizer = plan, target, prompts, tokenizer
        self.model = str(target.model_dir)

    def kind(self, rng: random.Random) -> str:
        plan = self.plan
        draw = rng.random()
        for kind, share in (
            ("disconnect", plan.disconnect_share),
            ("malformed", plan.malformed_share),
            ("prefill", plan.prefill_share),
            ("stream", plan.stream_share),
        ):
            if draw < share:
                return rng.choice(MALFORMED) if kind == "malformed" else kind
            draw -= share
        return "chat"

    def user_text(self, rng: random.Random, harmful: bool) -> str:
        text = rng.choice(self.prompts.harmful if harmful else self.prompts.benign)
        if rng.random() >= self.plan.long_share:
            return text
        budget = rng.randint(64, self.target.max_model_len - self.plan.max_tokens - 64)
        context: list[str] = []
        while len(self.tokenizer("\n".join(context)).input_ids) < budget:
            context.append(rng.choice(self.prompts.filler))
        ids = self.tokenizer("\n".join(context)).input_ids[:budget]
        return f"Here are my notes:\n{self.tokenizer.decode(ids)}\n\nNow, {text}"

    def body(self, kind: str, rng: random.Random) -> tuple[dict[str, Any] | bytes, bool, float | None]:
        """The request body (bytes for invalid JSON), whether its prompt is harmful, and the α it asks for."""
        harmful = rng.random() < 0.5
        messages = [{"role": "user", "content": self.user_text(rng, harmful)}]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0, "return_token_ids": True}
        body["max_tokens"] = rng.randint(1, self.plan.max_tokens)
        alpha = None
        if rng.random() < self.plan.alpha_share:  # at or above every default α: valid in every epoch
            alpha = round(rng.uniform(max(self.target.alphas), self.target.max_alpha), 2)
            body["vllm_xargs"] = {"safetylock_alpha": alpha}
        if kind == "prefill":
            messages.append({"role": "assistant", "content": rng.choice(("Sure, here is", "Step 1:", "Of course."))})
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        elif kind == "alpha-above-max":
            body["vllm_xargs"] = {"safetylock_alpha": self.target.max_alpha + 1}
        elif kind == "alpha-nan":
            return json.dumps({**body, "vllm_xargs": {"safetylock_alpha": float("nan")}}).encode(), harmful, None
        elif kind == "alpha-string":
            body["vllm_xargs"] = {"safetylock_alpha": "strong"}
        elif kind == "huge-max-tokens":
            body["max_tokens"] = 10**9
        elif kind == "invalid-json":
            return json.dumps(body).encode()[:40], harmful, None
        elif kind == "unknown-adapter":
            body["model"] = "no-such-adapter"
        elif kind == "prompt-too-long":
            words = " ".join(rng.choice(self.prompts.filler) for _ in range(self.target.max_model_len))
            messages[0]["content"] = words
        return body, harmful, alpha


async def _send(client, kind: str, body: dict | bytes, rng: random.Random, record: Record) -> None:
    """Send one request and fill ``record`` with what came back."""
    import httpx

    stream = kind in ("stream", "disconnect")
    route = "/v1/chat/completions"
    try:
        if isinstance(body, bytes):
            response = await client.post(route, content=body, headers={"Content-Type": "application/json"})
            _fill_error(record, response.status_code, response.text)
            return
        if not stream:
            response = await client.post(route, json=body)
            if response.status_code != 200:
                _fill_error(record, response.status_code, response.text)
                return
            reply = response.json()
            choice = reply["choices"][0]
            record.status, record.prompt_ids = 200, reply.get("prompt_token_ids") or []
            record.output_ids, record.finish = choice.get("token_ids") or [], choice.get("finish_reason")
            record.text = (choice.get("message") or {}).get("content") or ""
            return
        drop_after = rng.randint(1, 4) if kind == "disconnect" else None
        async with client.stream("POST", route, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                _fill_error(record, response.status_code, (await response.aread()).decode(errors="replace"))
                return
            record.status = 200
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                record.prompt_ids = record.prompt_ids or chunk.get("prompt_token_ids") or []
                for choice in chunk.get("choices") or []:
                    record.output_ids += choice.get("token_ids") or []
                    record.text += (choice.get("delta") or {}).get("content") or ""
                    record.finish = choice.get("finish_reason") or record.finish
                record.chunks += 1
                if drop_after is not None and record.chunks >= drop_after and record.finish is None:
                    record.disconnected = True  # leaving the block closes the connection mid-answer
                    break
    except httpx.HTTPError as exc:
        record.status, record.message = type(exc).__name__, str(exc)[:200]


def _fill_error(record: Record, status: int, text: str) -> None:
    record.status = status
    try:
        record.message = json.loads(text).get("error", {}).get("message", text)[:300]
    except (ValueError, AttributeError):
        record.message = text[:300]


async def _client_loop(index: int, deadline: float, t0: float, traffic: Traffic, client, records: list, active: list):
    rng = random.Random(f"{traffic.plan.seed}:{index}")
    while time.monotonic() < deadline:
        kind = traffic.kind(rng)
        body, harmful, alpha = traffic.body(kind, rng)
        record = Record(kind, time.monotonic() - t0, alpha=alpha, harmful=harmful)
        active[0] += 1
        try:
            await _send(client, kind, body, rng, record)
        finally:
            active[0] -= 1
            record.end = time.monotonic() - t0
            records.append(record)


async def _swapper(plan: SoakPlan, target: SoakTarget, admin, deadline: float, t0: float, swaps: list, epochs: list):
    """Every ``swap_every_s``: swap the default α, then the lock, in turn (each an epoch of its own)."""
    lock, alpha, step, since = 0, target.alphas[0], 0, 0.0
    while True:
        await asyncio.sleep(plan.swap_every_s)
        if time.monotonic() + 1 >= deadline:
            break
        if step % 2 == 0:
            body = {"alpha": target.alphas[1] if alpha == target.alphas[0] else target.alphas[0]}
        else:
            body = {"lock": str(target.locks[1 - lock])}
        started = time.monotonic() - t0
        response = await admin.post("/safetylock/swap", json=body)
        done = time.monotonic() - t0
        swaps.append({"t": started, "took_s": done - started, "body": body, "status": response.status_code})
        if response.status_code == 200:  # requests running while it was applied belong to no epoch
            epochs.append(Epoch(since, started, lock, alpha))
            lock, alpha, since = (1 - lock if "lock" in body else lock), body.get("alpha", alpha), done
        step += 1
    epochs.append(Epoch(since, math.inf, lock, alpha))


def _process_tree(pid: int) -> tuple[dict[str, float], set[int]]:
    """RSS (MiB) of the server and each of its children, by process name (``api_server``, ``VLLM::EngineCore``,
    ``VLLM::Worker``, …; the same name summed), and the children's pids."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}, set()
    rss: dict[str, float] = {}
    for index, process in enumerate(processes):
        with contextlib.suppress(psutil.NoSuchProcess):
            name = "api_server" if index == 0 else process.name()
            rss[name] = rss.get(name, 0.0) + process.memory_info().rss / 2**20
    return rss, {p.pid for p in processes[1:]}


async def _sampler(plan: SoakPlan, proc, client, deadline: float, t0: float, records, active, samples: list):
    while time.monotonic() < deadline:
        rss, _ = _process_tree(proc.pid)
        try:
            metrics = parse_metrics((await client.get("/metrics")).text)
        except Exception:  # noqa: BLE001 (a failed scrape is a missing sample, the traffic shows the failure)
            metrics = dict.fromkeys(("vllm:kv_cache_usage_perc",), math.nan)
        samples.append(
            Sample(
                time.monotonic() - t0,
                active[0],
                sum(r.status == 200 for r in records),
                sum(rss.values()) if rss else math.nan,
                metrics.get("vllm:kv_cache_usage_perc", math.nan),
                metrics.get("vllm:num_requests_running", math.nan),
                metrics.get("vllm:num_requests_waiting", math.nan),
                metrics.get("vllm:num_preemptions_total", math.nan),
                metrics.get("safetylock_gate_decisions_total", math.nan),
                metrics.get("safetylock_gate_fired_total", math.nan),
                {name: round(value, 1) for name, value in rss.items()},
            )
        )
        await asyncio.sleep(plan.sample_every_s)


async def _drive(plan: SoakPlan, target: SoakTarget, traffic: Traffic, proc, port: int) -> dict[str, Any]:
    import httpx

    base = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=plan.max_concurrency + 8, max_keepalive_connections=plan.max_concurrency)
    records: list[Record] = []
    swaps: list[dict] = []
    epochs: list[Epoch] = []
    samples: list[Sample] = []
    active = [0]
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        httpx.AsyncClient(base_url=base, timeout=900, limits=limits) as client,
        httpx.AsyncClient(base_url=base, timeout=300, headers=headers) as admin,
    ):
        t0 = time.monotonic()
        deadline = t0 + plan.duration_s
        tasks = [asyncio.create_task(_sampler(plan, proc, admin, deadline, t0, records, active, samples))]
        tasks.append(asyncio.create_task(_swapper(plan, target, admin, deadline, t0, swaps, epochs)))
        step = plan.ramp_s / max(1, plan.max_concurrency - 1)
        loops = [_client_loop(i, deadline, t0, traffic, client, records, active) for i in range(plan.max_concurrency)]
        await asyncio.gather(*(_delayed(i * step, loop) for i, loop in enumerate(loops)))
        await asyncio.gather(*tasks)
        metrics = parse_metrics((await admin.get("/metrics")).text)
    return {"records": records, "swaps": swaps, "epochs": epochs, "samples": samples, "metrics": metrics}


async def _delayed(delay: float, job) -> None:
    await asyncio.sleep(delay)
    await job


def soak(
    plan: SoakPlan, target: SoakTarget, prompts: Prompts, log_path: Path, refusal_message: str | None = None
) -> SoakResult:
    """Run the soak against a fresh server (its log at ``log_path``); the server is stopped at the end.
    ``refusal_message``: the refuse response's text, to count the answers that are it (None under steer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target.model_dir)
    traffic = Traffic(plan, target, prompts, tokenizer)
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        args = ["--max-model-len", str(target.max_model_len), *target.engine_args]
        proc = start_server(target.model_dir, port, target.section(), args, log, env={ENV_ADMIN_TOKEN: ADMIN_TOKEN})
        try:
            wait_healthy(proc, port)
            _, engine_pids = _process_tree(proc.pid)
            driven = asyncio.run(_drive(plan, target, traffic, proc, port))
            exit_code = proc.poll()
            _, engine_pids_end = _process_tree(proc.pid)
        finally:
            stop_server(proc)
    return SoakResult(
        plan,
        sorted(driven["records"], key=lambda r: r.start),
        driven["epochs"],
        driven["swaps"],
        driven["samples"],
        exit_code,
        engine_pids_end != engine_pids,
        driven["metrics"],
        refusal_message,
        target.refused_kinds,
    )


def epochs_during(record: Record, epochs: Sequence[Epoch]) -> list[Epoch]:
    """The epochs a request may have been served under: those its run overlapped, each widened over the swaps
    next to it (a swap is applied at some step inside its window)."""
    out = []
    for index, epoch in enumerate(epochs):
        start = epochs[index - 1].end if index else epoch.start
        end = epochs[index + 1].start if index + 1 < len(epochs) else math.inf
        if start <= record.end and record.start <= end:
            out.append(epoch)
    return out


def recheckable(result: SoakResult) -> list[tuple[Record, list[Epoch]]]:
    """Completed requests with the epochs they may have been served under. Under steer, only requests that ran
    inside one epoch (α and heads apply at every step); under refuse, any (α-off for every token, so the
    answer depends only on the gate's one decision, made under one of the locks in force while it ran)."""
    out = []
    for record in result.records:
        if record.completed and record.prompt_ids and record.output_ids:
            during = epochs_during(record, result.epochs)
            if result.refusal_message is not None or len({(e.lock, e.alpha) for e in during}) == 1:
                out.append((record, during))
    return out


def recheck(result: SoakResult, target: SoakTarget, tie: float = 1e-3) -> list[dict]:
    """Replay ``result.plan.recheck`` completed requests (``recheckable``; half the sample where the answer starts
    like the refusal, when there are any) in the HF model under their epoch's lock at their α — under refuse,
    under each lock in force while they ran, keeping the one that explains them; each served token must be the
    HF gated model's greedy choice (or within ``tie`` nats of it). Stored in ``result.rechecks``."""
    from tqdm import tqdm

    from safetylock.hf import load_model
    from safetylock.lockfile import load
    from safetylock.respond import refusal_ids

    candidates = recheckable(result)
    rng = random.Random(result.plan.seed)
    model, tokenizer = load_model(target.model_dir)
    refusal = None if result.refusal_message is None else refusal_ids(tokenizer, result.refusal_message)
    starts_refused = [c for c in candidates if refusal and c[0].output_ids[: len(refusal)] == refusal[: len(c[0].output_ids)]]
    others = [c for c in candidates if c not in starts_refused]
    half = result.plan.recheck // 2
    picked = rng.sample(starts_refused, min(half, len(starts_refused)))
    picked += rng.sample(others, min(result.plan.recheck - len(picked), len(others)))
    locks = [load(path) for path in target.locks]
    checks = []
    for record, during in tqdm(picked, desc="recheck in HF", unit="request"):
        replays = []
        for lock, alpha in sorted({(e.lock, e.alpha if record.alpha is None else record.alpha) for e in during}):
            replays.append((lock, alpha, *_replay(model, locks[lock], alpha, refusal, record)))
        lock, alpha, fired, gaps = min(replays, key=lambda r: max(r[3]))  # the epoch that explains it best
        checks.append(
            {
                "kind": record.kind,
                "alpha": alpha,
                "lock": lock,
                "epochs": len(during),
                "fired": fired,
                "tokens": len(record.output_ids),
                "max_gap": max(gaps),
                "exact": max(gaps) == 0.0,
                "equal": max(gaps) <= tie,
                "text": record.text[:160] if not record.harmful else "",  # harmful answers stay out of results
            }
        )
    result.rechecks = checks
    return checks


def _replay(model, lock, alpha: float, refusal: list[int] | None, record: Record) -> tuple[bool, list[float]]:
    """Teacher-force ``record``'s answer through the HF gated model: its gate decision, and per served token the
    gap in log-probability to the HF model's greedy choice (0: the same token)."""
    import torch

    from safetylock.apply import apply_gated

    with torch.no_grad(), apply_gated(model, lock, alpha, refusal=refusal) as handle:
        out = model(input_ids=torch.tensor([record.prompt_ids]), use_cache=True)
        fired = bool(handle.fired[0])
        gaps = []
        for step, token in enumerate(record.output_ids):
            logp = torch.log_softmax(handle.force(out.logits[:, -1], step)[0].double(), -1)
            gaps.append(float(logp.max() - logp[token]))
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return fired, gaps
