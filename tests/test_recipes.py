import pytest

from safetylock.errors import ExtractError
from safetylock.pipeline import load_model
from safetylock.recipes import contrast_examples, recipe

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
