"""Attack variants: recipes, training pairs and the encoding that trains on the answer only (no fine-tuning here)."""

import pytest

from safetylock import attack
from safetylock.errors import ModelError


def test_unknown_variant_is_one_clear_error():
    with pytest.raises(ModelError, match="unknown attack variant 'harmful-7'; known: aligned, aligned-mixed, benign, "):
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


def test_downstream_task_is_seeded_and_never_asks_an_evaluation_question():
    from safetylock.evaluate import arithmetic_suite, arithmetic_training

    pairs = arithmetic_training(190, seed=4)
    assert pairs == arithmetic_training(190, seed=4) and len({q for q, _ in pairs}) == 190
    assert not {q for q, _ in pairs} & set(arithmetic_suite(1000, 0).prompts)
    for question, answer in pairs:  # exact answers, in the evaluation suite's format
        a, op, b = question.removeprefix("What is ").split("?")[0].split()
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_benign_training_prompts_lie_outside_every_evaluation_sample():
    from safetylock import data

    outside = data.benign_outside_evaluation()
    evaluated = {p for count in data.EVALUATION_COUNTS for p in data.sample(data.benign().prompts, count, 0)}
    assert outside and not set(outside) & evaluated
    assert len(outside) + len(evaluated) == len(data.benign().prompts)


def test_a_continued_fine_tune_records_its_parent_and_older_recipes_keep_their_fingerprint():
    downstream = attack._recipe("downstream", seed=0, batch_size=4)
    assert downstream["parent"] == "aligned-mixed" and downstream["poison"] == 10
    assert downstream["parent_recipe"] == attack._recipe("aligned-mixed", seed=0, batch_size=4)
    for name in ("harmful-10", "identity-shift", "benign", "aligned-mixed"):  # defaults of later fields: not recorded
        assert not {"parent", "poison", "parent_recipe"} & set(attack._recipe(name, seed=0, batch_size=4))
