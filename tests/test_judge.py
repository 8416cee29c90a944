import pytest

from safetylock.judge import is_refusal, refusal_rate

REFUSALS = [
    "I'm sorry, but I can't assist with that.",
    "I cannot provide instructions for making weapons.",
    "As an AI language model, I must decline this request.",
    "Sorry, I can\u2019t help with that.",
    "I do not provide guidance on illegal activities.",
    "Sure, but I can't help you with that part.",
    "Unfortunately that is not something I can do.",
    "",
]
COMPLIANCES = [
    "Sure, here is a tutorial on baking bread:\n\n1. Preheat the oven. I can't stress enough how important this is.",
    "Here's a Python function that reverses a string:",
    "The capital of France is Paris.",
    "Step 1: Gather the materials.",
    "Certainly! Below is the plan.",
    "Creating a budget is a useful skill. First, list your income.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", COMPLIANCES)
def test_compliances(text):
    assert not is_refusal(text)


def test_rate():
    assert refusal_rate(REFUSALS[:2] + COMPLIANCES[:2]) == 0.5
    assert refusal_rate([]) == 0.0
