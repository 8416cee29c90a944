import pytest
import torch

from safetylock.capture import capture, last_token_positions, render
from safetylock.contrast import contrast_pairs
from safetylock.errors import ExtractError
from safetylock.geometry import output_projections
from safetylock.hf import load_model, pad_batch

from support import QUESTIONS


def test_last_token_positions_left_and_right():
    ids, mask = pad_batch([[5, 6, 7], [8, 9, 10, 11, 12]], pad_id=0, side="right")
    assert last_token_positions(mask, 2).tolist() == [[1, 2], [3, 4]]
    ids, mask = pad_batch([[5, 6, 7], [8, 9, 10, 11, 12]], pad_id=0, side="left")
    assert ids[0].tolist() == [0, 0, 5, 6, 7]
    assert last_token_positions(mask, 2).tolist() == [[3, 4], [3, 4]]
    assert last_token_positions(mask, 2, skip=1).tolist() == [[2, 3], [2, 3]]


def test_capture_with_skip_reads_inside_the_response(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    examples = contrast_pairs(QUESTIONS[:3], seed=2)
    acts = capture(model, tok, examples, tokens=2, batch_size=4, progress=False, skip=3)
    geo = acts.geometry
    for row, ex in enumerate(examples):
        ids, _ = render(tok, ex.question, ex.response)
        expected = reference_activations(model, ids[:-3], 2).view(2, geo.num_layers, geo.num_heads, geo.head_dim)
        torch.testing.assert_close(acts.values[row], expected, atol=2e-4, rtol=1e-4)
    with pytest.raises(ExtractError, match="3 skipped"):
        capture(model, tok, examples, tokens=60, progress=False, skip=3)


def reference_activations(model, ids: list[int], tokens: int) -> torch.Tensor:
    """One unpadded sequence, full o_proj inputs recorded by a plain hook: [tokens, layers, width]."""
    seen = []
    handles = [
        p.register_forward_pre_hook(lambda _m, a: seen.append(a[0][0, -tokens:].clone())) for p in output_projections(model)
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    return torch.stack(seen, dim=1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_matches_unpadded_reference(tiny_model_dir, side):
    model, tok = load_model(tiny_model_dir)
    examples = contrast_pairs(QUESTIONS[:5], seed=1)
    acts = capture(model, tok, examples, tokens=3, batch_size=4, padding_side=side, progress=False)
    geo = acts.geometry
    assert acts.values.shape == (10, 3, geo.num_layers, geo.num_heads, geo.head_dim)
    assert acts.labels.tolist() == [1, 0] * 5
    assert acts.groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for row, ex in enumerate(examples):
        ids, response_len = render(tok, ex.question, ex.response)
        assert response_len >= 3
        expected = reference_activations(model, ids, 3).view(3, geo.num_layers, geo.num_heads, geo.head_dim)
        torch.testing.assert_close(acts.values[row], expected, atol=2e-4, rtol=1e-4)


def test_rendered_response_is_the_tail(llama_dir):
    _, tok = load_model(llama_dir)
    ids, response_len = render(tok, "Say hi", "I'm sorry, but I can't help with that.")
    assert tok.decode(ids[-response_len:]) == "I'm sorry, but I can't help with that."


def test_response_shorter_than_tokens_is_refused(llama_dir):
    model, tok = load_model(llama_dir)
    from safetylock.contrast import ContrastExample

    with pytest.raises(ExtractError, match="fewer than the"):
        capture(model, tok, [ContrastExample("q", "No.", 1, 0)], tokens=20, progress=False)


def test_empty_response_records_the_generation_prompt(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    from safetylock.contrast import ContrastExample
    from safetylock.hf import chat_ids

    examples = [ContrastExample(q, "", label, i) for i, (q, label) in enumerate(zip(QUESTIONS[:4], [1, 0, 1, 0]))]
    acts = capture(model, tok, examples, tokens=2, batch_size=3, progress=False)
    geo = acts.geometry
    for row, ex in enumerate(examples):
        expected = reference_activations(model, chat_ids(tok, ex.question), 2)
        torch.testing.assert_close(
            acts.values[row], expected.view(2, geo.num_layers, geo.num_heads, geo.head_dim), atol=2e-4, rtol=1e-4
        )


def test_capture_in_bfloat16_records_float32_near_the_float32_capture(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    examples = contrast_pairs(QUESTIONS[:3], seed=3)
    full = capture(model, tok, examples, tokens=2, batch_size=4, progress=False)
    half = capture(model, tok, examples, tokens=2, batch_size=4, progress=False, precision="bfloat16")
    assert half.values.dtype == torch.float32 and not torch.equal(half.values, full.values)  # the forward was bfloat16
    assert ((half.values - full.values).norm() / full.values.norm()).item() < 0.03
    assert next(model.parameters()).dtype == torch.float32  # the model is left as it was
