import pytest

from safetylock.errors import ExtractError
from safetylock.hf import generate, load_model
from safetylock.recipes import ANSWER_BATCH, contrast_examples, greedy_answers, recipe

from support import QUESTIONS


def test_unknown_recipe_is_named():
    with pytest.raises(ExtractError, match="unknown probe recipe 'own'"):
        recipe("own")


def test_templates_recipe_is_the_contrast_pairs(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    examples = contrast_examples("templates", model, tok, QUESTIONS[:3], tokens=5, seed=0)
    assert [e.safe for e in examples] == [1, 0] * 3


def test_answers_recipe_refuses_a_model_that_does_not_refuse(tiny_model_dir):
    """A random model never refuses: the recipe stops before the teacher's generation, naming why."""
    model, tok = load_model(tiny_model_dir)
    with pytest.raises(ExtractError, match="the model refused 0 of 4 questions"):
        contrast_examples("answers", model, tok, QUESTIONS[:4], tokens=5, seed=0, progress=False)


def test_greedy_answers_stop_early_with_the_whole_calls_first_answers(llama_dir, tmp_path, monkeypatch):
    """``enough`` stops after the first batch that satisfies it; the prefix equals a whole-tuple call's answers,
    and a later call on the same tuple continues from the cached prefix."""
    monkeypatch.setenv("SAFETYLOCK_CACHE", str(tmp_path))
    prompts = tuple(f"{q} ({i})" for i, q in enumerate(QUESTIONS * 4))[:20]
    model, tok = load_model(llama_dir)
    whole = generate(model, tok, prompts, max_new_tokens=4, batch_size=ANSWER_BATCH)
    seen: list[int] = []

    def nine(answers: list[str]) -> bool:
        seen.append(len(answers))
        return len(answers) >= 9

    early = greedy_answers(str(llama_dir), prompts, 4, enough=nine)
    assert len(early) == 2 * ANSWER_BATCH and early == whole[: len(early)]
    assert seen[-1] == 2 * ANSWER_BATCH  # checked after each batch, stopped at the first that satisfied it
    assert greedy_answers(str(llama_dir), prompts, 4) == whole  # continued from the cached prefix
