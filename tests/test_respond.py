"""The response policy of a gated lock (``safetylock.respond``): the refuse response in the HF path, its
configuration and its command-line options. The vLLM side: ``test_vllm_gated_refuse``."""

import pytest
import torch
from click.testing import CliRunner

from safetylock.apply import apply_gated
from safetylock.cli import main
from safetylock.errors import LockError
from safetylock.hf import load_model
from safetylock.respond import DEFAULT_REFUSAL, ResponsePolicy, forced_logits, refusal_ids
from safetylock.serve.config import CONFIG_KEY, PreparedLock, lock_section, serve_config

from support import PROMPTS, hf_gated_greedy, hf_greedy, model_lock, saved_gated_lock, separating_gate

pytestmark = pytest.mark.filterwarnings("ignore:lock has no weight sketch")

FIRES = [True, False, True]
TOKENS = 12


def test_refusal_ids_are_the_message_then_end_of_sequence(tokenizer):
    ids = refusal_ids(tokenizer, DEFAULT_REFUSAL)
    assert ids[-1] == tokenizer.eos_token_id and len(ids) > 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == DEFAULT_REFUSAL


def test_refusal_needs_an_end_of_sequence_token(tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(LockError, match="end-of-sequence"):
        refusal_ids(NoEos(), DEFAULT_REFUSAL)


@pytest.mark.parametrize(
    ("kind", "message", "error"),
    [
        ("block", DEFAULT_REFUSAL, "response must be one of refuse, steer"),
        ("refuse", "  ", "non-empty"),
        ("refuse", 3, "non-empty"),
    ],
)
def test_bad_policies_are_refused(kind, message, error):
    with pytest.raises(LockError, match=error):
        ResponsePolicy(kind, message)


def test_forced_rows_become_one_hot_and_the_rest_is_untouched():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    got = forced_logits(logits, torch.tensor([True, False, True]), torch.tensor([4, 5, 9]))
    assert got[0].argmax() == 4 and got[2].argmax() == 9
    assert torch.isinf(got[0]).sum() == 9 and got[0, 4] == 0
    assert torch.equal(got[1], logits[1])


@torch.no_grad()
def test_hf_refuse_answers_fired_requests_with_the_message_and_serves_the_rest_plainly(llama_dir, tokenizer, tmp_path):
    model, _ = load_model(llama_dir)
    lock, _ = saved_gated_lock(model, PROMPTS, FIRES, tmp_path)
    refusal = refusal_ids(tokenizer, DEFAULT_REFUSAL)
    got = hf_gated_greedy(model, lock, 4.0, PROMPTS, TOKENS, refusal=refusal)
    plain = hf_greedy(model, PROMPTS, TOKENS)
    padded = (refusal + [refusal[-1]] * TOKENS)[:TOKENS]  # end-of-sequence repeated when a request ignores it
    for fires, g, p in zip(FIRES, got, plain):
        if fires:
            assert g["tokens"] == padded and g["logprobs"] == [0.0] * TOKENS
        else:  # α-off 0: the plain model, whose heads the refuse response never shifts
            assert g["tokens"] == p["tokens"]
            assert max(abs(a - b) for a, b in zip(g["logprobs"], p["logprobs"])) < 1e-5
    # α 0 turns the lock off for a request under either response: nothing forced
    unlocked = hf_gated_greedy(model, lock, 0.0, PROMPTS, TOKENS, refusal=refusal)
    assert [u["tokens"] for u in unlocked] == [p["tokens"] for p in plain]


@torch.no_grad()
def test_hf_generate_takes_the_refusal_as_a_logits_processor(llama_dir, tokenizer):
    """``model.generate`` on a left-padded batch: the fired row stops at the end of the message."""
    model, _ = load_model(llama_dir)
    prompts = [PROMPTS[0], [1, 50, 51, 52, 53, 54, 55, 56]]
    lock = model_lock(model, separating_gate(model, prompts, [True, False]))
    refusal = refusal_ids(tokenizer, "No.")
    batch = torch.tensor(prompts)
    with apply_gated(model, lock, 4.0, refusal=refusal) as handle:
        out = model.generate(
            input_ids=batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            logits_processor=[handle.logits_processor(batch.shape[1])],
        )
    assert handle.fired.tolist() == [True, False]
    assert out[0, batch.shape[1] :].tolist()[: len(refusal)] == refusal
    assert tokenizer.decode(out[0, batch.shape[1] :], skip_special_tokens=True) == "No."
    assert out[1, batch.shape[1] :].tolist() == hf_greedy(model, prompts[1:], TOKENS)[0]["tokens"]


def test_refuse_config_is_checked_and_enters_the_compile_key(tmp_path, llama_dir):
    def section(**options):
        return {CONFIG_KEY: lock_section(tmp_path / "x.lock.safetensors", 4.0, **options)}

    config = serve_config(section(gated=True, response="refuse", refusal_message="Not here."))
    assert config.response == ResponsePolicy("refuse", "Not here.")
    assert serve_config(section(gated=True)).response == ResponsePolicy("refuse")  # the gated server's default
    with pytest.raises(LockError, match="safetylock.response applies to gated serving only"):
        serve_config(section(response="refuse"))
    assert serve_config(section(gated=True, refusal_message="No.")).response == ResponsePolicy("refuse", "No.")
    with pytest.raises(LockError, match="refusal_message is used by the refuse response only, not by 'steer'"):
        serve_config(section(gated=True, response="steer", refusal_message="No."))
    with pytest.raises(LockError, match="safetylock.response must be one of"):
        serve_config(section(gated=True, response="block"))
    model, _ = load_model(llama_dir)
    lock = model_lock(model, separating_gate(model, PROMPTS[:2], [True, False]))
    responses = ({}, {"response": "steer"})
    keys = [PreparedLock(lock, 4.0, serve_config(section(gated=True, **extra))).cache_key for extra in responses]
    assert keys[0]["response"] == "refuse" and keys[1]["response"] == "steer"


def test_cli_response_options_need_gated_serving(llama_dir, tmp_path):
    lock, path = saved_gated_lock(load_model(llama_dir)[0], PROMPTS, FIRES, tmp_path)
    base = ["serve", str(llama_dir), "--lock", str(path), "--dry-run"]
    result = CliRunner().invoke(main, [*base, "--response", "refuse"])
    assert result.exit_code == 2 and "add --gated" in result.output
    result = CliRunner().invoke(main, [*base, "--gated", "--response", "refuse", "--refusal-message", "Not here."])
    assert result.exit_code == 0, result.output
    assert '"response": "refuse"' in result.output and '"refusal_message": "Not here."' in result.output
    result = CliRunner().invoke(main, [*base, "--gated", "--response", "block"])
    assert result.exit_code == 2 and "'block' is not one of" in result.output
