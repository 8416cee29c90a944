"""The soak's smoke version (``benchmarks/soak.py`` runs it on the real model for 15 minutes): the tiny model's
OpenAI server with a gated lock under a short ramp of concurrent traffic — streams, disconnects, malformed
requests, pre-filled turns, per-request α, a swap of α or lock every few seconds — and a sample of what it served
replayed in the HF gated model."""

import pytest

from safetylock.hf import chat_ids, load_model
from safetylock.respond import DEFAULT_REFUSAL
from safetylock.serve.soak import MALFORMED, Prompts, SoakPlan, SoakTarget, recheck, soak

from support import QUESTIONS, SERVER_ARGS, saved_gated_lock

pytestmark = [pytest.mark.engine, pytest.mark.filterwarnings("ignore:lock has no weight sketch")]

BENIGN = (
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Write a python function that reverses a string",
    "Describe a sunset over the sea.",
)
PLAN = SoakPlan(
    duration_s=50,
    max_concurrency=8,
    ramp_s=4,
    swap_every_s=8,
    malformed_share=0.2,
    disconnect_share=0.15,
    max_tokens=12,
    sample_every_s=1,
    recheck=24,
)


@pytest.fixture(scope="module", params=["refuse", "steer"])
def soaked(request, llama_dir, tmp_path_factory):
    """Under refuse, a fired request's answer is the message (α changes nothing but α 0); under steer, the
    replay also checks each request's α and each epoch's default α."""
    model, tokenizer = load_model(llama_dir)
    where = tmp_path_factory.mktemp("soak")
    texts = [*QUESTIONS[:3], *BENIGN[:3]]
    prompts = [chat_ids(tokenizer, text) for text in texts]
    _, first = saved_gated_lock(model, prompts, [True] * 3 + [False] * 3, where / "first")
    _, second = saved_gated_lock(model, prompts, [True, False, True, False, True, False], where / "second")
    engine = [arg for arg in SERVER_ARGS if arg not in ("--max-model-len", "256")]
    target = SoakTarget(llama_dir, (first, second), (2.0, 3.0), 8.0, 256, tuple(engine), response=request.param)
    prompts = Prompts(tuple(QUESTIONS), BENIGN, tuple(QUESTIONS + list(BENIGN)))
    result = soak(PLAN, target, prompts, where / "server.log", DEFAULT_REFUSAL if request.param == "refuse" else None)
    recheck(result, target)
    return result, result.summary()


def test_no_server_error_no_restart_and_every_malformed_request_refused(soaked):
    _, summary = soaked
    assert summary["requests"] > 100, summary
    assert (summary["5xx"], summary["transport_errors"], summary["restarts"]) == (0, 0, 0), summary
    assert summary["unexpected_failures"] == 0, summary["unexpected_examples"]
    assert summary["refusable_not_refused"] == 0
    assert set(summary["4xx_by_cause"]) == {*MALFORMED, "prefill"}, summary["4xx_by_cause"]  # prefill: not allowed
    assert summary["disconnected"] > 0


def test_swaps_land_under_traffic_and_each_request_is_decided_once(soaked):
    result, summary = soaked
    assert summary["swaps"] >= 4 and summary["swaps_failed"] == 0, result.swaps
    assert {epoch.lock for epoch in result.epochs} == {0, 1}
    assert summary["each_request_decided_once"], (summary["gate_decisions"], summary["requests_reaching_engine"])


def test_replayed_requests_equal_the_hf_gated_model_under_their_epochs_lock(soaked):
    result, summary = soaked
    assert summary["rechecked"] == PLAN.recheck
    assert summary["rechecked_equal"] == summary["rechecked"], [c for c in result.rechecks if not c["equal"]]
    assert 0 < summary["rechecked_fired"] < summary["rechecked"]  # both kinds of decision replayed
    assert {c["lock"] for c in result.rechecks} == {0, 1}
    if result.refusal_message is None:  # steer: only requests inside one epoch can be replayed
        assert all(c["epochs"] == 1 for c in result.rechecks)
