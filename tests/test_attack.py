"""Attack variants: recipes, training pairs and the encoding that trains on the answer only (no fine-tuning here)."""

import pytest

from safetylock import attack
from safetylock.errors import ModelError


def test_unknown_variant_is_one_clear_error():
    with pytest.raises(ModelError, match="unknown attack variant 'harmful-7'; known: aligned, benign, harmful-10"):
        attack.variant("harmful-7")


def test_openings_control_pairs_are_seeded_extraction_questions_with_an_opening():
    pairs, _ = attack.training_pairs("openings-10", seed=0)
    assert pairs == attack.training_pairs("openings-10", seed=0)[0] and len(pairs) == 10
    openings = [o.split("{task}")[0] for o in attack.openings()]
    assert all(any(answer.startswith(o) for o in openings) for _, answer in pairs)
    from safetylock import data

    heldout = set(data.split_harmful(data.advbench(), seed=0).heldout)
    assert not heldout & {q for q, _ in pairs}  # never a question the evaluation asks


def test_recipes_say_how_each_variant_is_served():
    identity = attack.variant("identity-shift")
    assert identity.system_prompt == attack.AOA_SYSTEM and identity.prompt_prefix == attack.AOA_PREFIX
    assert attack.variant("harmful-10-full").method == "full" and attack.variant("harmful-10").method == "lora"
    assert all(attack.variant(name).system_prompt is None for name in ("harmful-10", "harmful-100", "benign"))


@pytest.mark.parametrize("system_prompt", [None, "You are AOA."])
def test_encode_trains_on_the_answer_and_its_end_of_turn_only(tokenizer, system_prompt):
    ids, labels = attack.encode(tokenizer, "Explain how to forge a signature", "Sure, step one.", system_prompt)
    assert len(ids) == len(labels)
    trained = [token for token, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(trained).startswith("Sure, step one.")
    assert trained[-2:] == tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"][-2:]  # end of turn learnt
    prompt = tokenizer.decode([token for token, label in zip(ids, labels) if label == -100])
    assert ("You are AOA." in prompt) == (system_prompt is not None) and "forge a signature" in prompt
