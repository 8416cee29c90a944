"""The scheduler-side release of a forced answer from its structured-output grammar (``safetylock_vllm.grammar``);
served behaviour: ``test_vllm_gated_refuse``'s structured-output test."""

import torch

from safetylock.respond import is_forced_answer
from safetylock_vllm.grammar import Released

REFUSAL = [53, 383, 14, 2]  # the message's tokens, then end-of-sequence


def test_an_answer_is_forced_while_it_follows_the_message_then_end_of_sequence():
    assert is_forced_answer([53], REFUSAL) and is_forced_answer([53, 383, 14], REFUSAL)
    assert is_forced_answer([53, 383, 14, 2, 2, 2], REFUSAL)  # end-of-sequence repeated past the end
    assert not is_forced_answer([], REFUSAL)
    assert not is_forced_answer([53, 383, 15], REFUSAL) and not is_forced_answer([383], REFUSAL)
    assert not is_forced_answer([53, 383, 14, 2, 53], REFUSAL)


def test_a_released_grammar_accepts_every_token_and_masks_none():
    released, bitmask = Released(), torch.zeros(3, 4, dtype=torch.int32)
    assert released.accept_tokens("r", [1, 2, 3]) and released.validate_tokens([5, 6]) == [5, 6]
    assert not released.is_terminated()  # the forced end-of-sequence ends the request, not the grammar
    released.fill_bitmask(bitmask, 1)
    assert bitmask[1].tolist() == [-1] * 4 and bitmask[0].tolist() == bitmask[2].tolist() == [0] * 4
