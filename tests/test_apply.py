import pytest
import torch

from safetylock.apply import apply
from safetylock.geometry import HeadGeometry, output_projections
from safetylock.hf import load_model
from safetylock.lockfile import LockError

from support import logits, reference_hooks, tiny_lock

PROMPT = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 2]])


def test_bias_fold_equals_reference_hook(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    lock = tiny_lock(model, tok)
    plain = logits(model, PROMPT)
    handles = reference_hooks(model, lock, alpha=4.0)
    reference = logits(model, PROMPT)
    for h in handles:
        h.remove()
    with apply(model, lock, alpha=4.0):
        folded = logits(model, PROMPT)
    assert (reference - plain).abs().max() > 1e-2  # the lock really changes the output
    torch.testing.assert_close(folded, reference, atol=1e-4, rtol=1e-4)


def test_removal_restores_the_model_exactly(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    lock = tiny_lock(model, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = logits(model, PROMPT)
    handle = apply(model, lock, alpha=2.0)
    assert any(p.bias is not None for p in output_projections(model))
    handle.remove()
    handle.remove()  # idempotent
    assert all(p.bias is None for p in output_projections(model))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(model, PROMPT), plain)


def test_existing_bias_is_added_to_and_restored(llama_dir):
    model, tok = load_model(llama_dir)
    lock = tiny_lock(model, tok)
    proj = output_projections(model)[int(lock.layers[0])]
    proj.bias = torch.nn.Parameter(torch.randn(proj.out_features))
    original = proj.bias.detach().clone()
    with apply(model, lock, alpha=1.0):
        assert not torch.equal(proj.bias, original)
    assert torch.equal(proj.bias, original)


def test_alpha_zero_is_identity_and_default_alpha_is_the_locks(llama_dir):
    model, tok = load_model(llama_dir)
    lock = tiny_lock(model, tok)
    plain = logits(model, PROMPT)
    with apply(model, lock, alpha=0.0):
        torch.testing.assert_close(logits(model, PROMPT), plain)
    with apply(model, lock) as handle:
        assert handle.alpha == lock.default_alpha


def test_mismatched_geometry_is_refused(llama_dir):
    model, tok = load_model(llama_dir)
    lock = tiny_lock(model, tok)
    lock.geometry = HeadGeometry(num_layers=5, num_heads=2, num_kv_heads=1, head_dim=64, hidden_size=128)
    with pytest.raises(LockError, match="num_layers is 3 in the model but 5 in the lock"):
        apply(model, lock)
    assert all(p.bias is None for p in output_projections(model))
