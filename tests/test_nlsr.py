"""NLSR on tiny adapters: amplification, masks, ranking, patch, determinism, refusal of bad adapters."""

import json

import pytest
import torch

from safetylock import nlsr
from safetylock.contrast import contrast_pairs
from safetylock.hf import load_model
from safetylock.lora import AdapterError, LoraAdapter, load_adapter

from support import QUESTIONS, write_lora


def adapter(seed: int, modules=("m0", "m1", "m2", "m3"), rank=4, shape=(24, 16)) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    a = {m: torch.randn(rank, shape[1], generator=gen) for m in modules}
    b = {m: torch.randn(shape[0], rank, generator=gen) for m in modules}
    return LoraAdapter({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["x"]}, a, b)


def stats_for(ad: LoraAdapter, seed: int = 9) -> nlsr.SafetyStats:
    gen = torch.Generator().manual_seed(seed)
    stats = nlsr.SafetyStats()
    for m in ad.modules:
        x = torch.randn(50, ad.a[m].shape[1], generator=gen, dtype=torch.float64)
        z = x @ ad.a[m].double().T
        stats.gram[m], stats.input_sq[m] = z.T @ z, (x * x).sum(0)
    return stats


def test_amplification_arithmetic():
    aligned, weak = adapter(0), adapter(1)
    alone = nlsr.amplify(aligned, None, 0.5)
    for m in aligned.modules:
        torch.testing.assert_close(alone.delta(m), 1.5 * aligned.delta(m))
    both = nlsr.amplify(aligned, weak, 0.5)
    torch.testing.assert_close(both.a["m0"], 1.5 * aligned.a["m0"] - 0.5 * weak.a["m0"])
    torch.testing.assert_close(both.b["m0"], 1.5 * aligned.b["m0"] - 0.5 * weak.b["m0"])


@pytest.mark.parametrize("method", ["lowrank", "wanda"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
def test_mask_sparsity_is_exact(method, sparsity):
    ad = adapter(0)
    stats = stats_for(ad)
    mask_a, mask_b = nlsr.safety_masks(
        ad.a["m0"], ad.b["m0"], stats.gram["m0"], stats.input_sq["m0"], nlsr.NlsrConfig(sparsity=sparsity, method=method)
    )
    assert int(mask_a.sum()) == round((1 - sparsity) * mask_a.numel())
    assert int(mask_b.sum()) == round((1 - sparsity) * mask_b.numel())


def test_lowrank_mask_follows_the_safety_subspace():
    """With safety outputs confined to one direction of A's output space, the mask picks that row of A."""
    ad = adapter(0, modules=("m0",))
    gram = torch.zeros(4, 4, dtype=torch.float64)
    gram[2, 2] = 1.0
    mask_a, _ = nlsr.safety_masks(ad.a["m0"], ad.b["m0"], gram, torch.ones(16), nlsr.NlsrConfig(sparsity=0.75))
    assert mask_a[2].all() and not mask_a[[0, 1, 3]].any()


def test_least_similar_module_is_most_likely_patched():
    probabilities = nlsr.selection_probabilities([0.9, -0.2, 0.5, 0.1], prune_rate=0.3)
    assert probabilities.index(max(probabilities)) == 1 and probabilities.index(min(probabilities)) == 0
    assert sum(probabilities) / 4 == pytest.approx(0.3)
    assert all(0 <= p <= 1 for p in probabilities)


def test_similarity_ranks_drifted_modules_lowest():
    aligned = adapter(0)
    finetuned = adapter(0)
    finetuned.b["m3"] = -finetuned.b["m3"]  # m3 drifted all the way
    _, reports = nlsr.realign(aligned, finetuned, stats_for(nlsr.amplify(aligned, None, 0.9)), nlsr.NlsrConfig(prune_rate=0.5))
    by_module = {r.module: r for r in reports}
    assert by_module["m3"].similarity < 0 < by_module["m0"].similarity
    assert by_module["m3"].probability == max(r.probability for r in reports)


def test_patch_touches_only_masked_entries_of_selected_modules():
    aligned, finetuned = adapter(0), adapter(5)
    config = nlsr.NlsrConfig(sparsity=0.75, prune_rate=0.5, beta=0.9, seed=3)
    amplified = nlsr.amplify(aligned, None, config.beta)
    stats = stats_for(amplified)
    repaired, reports = nlsr.realign(aligned, finetuned, stats, config)
    assert any(r.patched for r in reports) and not all(r.patched for r in reports)
    for r in reports:
        mask_a, mask_b = nlsr.safety_masks(
            amplified.a[r.module], amplified.b[r.module], stats.gram[r.module], stats.input_sq[r.module], config
        )
        new_a, new_b = repaired.a[r.module], repaired.b[r.module]
        if not r.patched:
            assert torch.equal(new_a, finetuned.a[r.module]) and torch.equal(new_b, finetuned.b[r.module])
            continue
        assert torch.equal(new_a[~mask_a], finetuned.a[r.module][~mask_a])
        assert torch.equal(new_a[mask_a], amplified.a[r.module][mask_a])
        assert torch.equal(new_b[~mask_b], finetuned.b[r.module][~mask_b])
        assert torch.equal(new_b[mask_b], amplified.b[r.module][mask_b])
        assert r.entries == int(mask_a.sum() + mask_b.sum())


def test_seed_determinism():
    aligned, finetuned = (
        adapter(0, modules=tuple(f"m{i}" for i in range(12))),
        adapter(5, modules=tuple(f"m{i}" for i in range(12))),
    )
    stats = stats_for(nlsr.amplify(aligned, None, 0.9))

    def patched(seed):
        return tuple(r.patched for r in nlsr.realign(aligned, finetuned, stats, nlsr.NlsrConfig(seed=seed))[1])

    assert patched(1) == patched(1)
    assert len({patched(seed) for seed in range(8)}) > 1  # the Bernoulli draws do depend on the seed


def test_mismatched_adapters_are_refused():
    aligned = adapter(0)
    with pytest.raises(AdapterError, match="has rank 8, expected 4"):
        nlsr.realign(aligned, adapter(1, rank=8), stats_for(aligned), nlsr.NlsrConfig())
    with pytest.raises(AdapterError, match="adapts other modules"):
        nlsr.realign(aligned, adapter(1, modules=("m0", "zz")), stats_for(aligned), nlsr.NlsrConfig())
    with pytest.raises(AdapterError, match="other shapes"):
        nlsr.realign(aligned, adapter(1, shape=(24, 8)), stats_for(aligned), nlsr.NlsrConfig())
    other_base = adapter(1)
    aligned.config["base_model_name_or_path"], other_base.config["base_model_name_or_path"] = "/m/qwen", "/m/llama"
    with pytest.raises(AdapterError, match="was trained on base"):
        nlsr.realign(aligned, other_base, stats_for(aligned), nlsr.NlsrConfig())
    with pytest.raises(ValueError, match="sparsity must be in"):
        nlsr.NlsrConfig(sparsity=1.0)


def test_adapter_files_round_trip_and_malformed(tmp_path, llama_dir):
    path = write_lora(llama_dir, tmp_path / "a")
    loaded = load_adapter(path)
    assert loaded.rank == 4 and len(loaded.modules) == 6
    loaded.save(tmp_path / "b")
    again = load_adapter(tmp_path / "b")
    assert all(torch.equal(again.a[m], loaded.a[m]) and torch.equal(again.b[m], loaded.b[m]) for m in loaded.modules)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    torch.save(
        {f"{m}.lora_A.weight": loaded.a[m] for m in loaded.modules}
        | {f"{m}.lora_B.weight": loaded.b[m] for m in loaded.modules},
        bin_dir / "adapter_model.bin",
    )
    assert load_adapter(bin_dir).modules == loaded.modules
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(tmp_path / "missing")
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(AdapterError, match="do not have rank 2"):
        load_adapter(tmp_path / "b")
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="unreadable adapter_model.safetensors"):
        load_adapter(tmp_path / "b")


def test_safety_statistics_on_a_tiny_model(llama_dir, tmp_path):
    model, tok = load_model(llama_dir)
    ad = load_adapter(write_lora(llama_dir, tmp_path / "a"))
    examples = [ex for ex in contrast_pairs(QUESTIONS[:4], seed=0) if ex.safe]
    stats = nlsr.safety_statistics(model, tok, ad, examples, batch_size=3, progress=False)
    module = ad.modules[0]
    assert stats.gram[module].shape == (4, 4) and stats.input_sq[module].shape == (128,)
    eigenvalues = torch.linalg.eigvalsh(stats.gram[module])
    assert eigenvalues.min() > -1e-6 and eigenvalues.max() > 0  # a real Gram matrix of real activations
    batched = nlsr.safety_statistics(model, tok, ad, examples, batch_size=1, progress=False)
    torch.testing.assert_close(batched.gram[module], stats.gram[module], rtol=1e-4, atol=1e-4)  # padding excluded


def test_realign_cli(llama_dir, tmp_path):
    from click.testing import CliRunner

    from safetylock.cli import main

    aligned, finetuned = write_lora(llama_dir, tmp_path / "al", seed=1), write_lora(llama_dir, tmp_path / "ft", seed=2)
    args = [
        "realign",
        "--base",
        str(llama_dir),
        "--aligned",
        str(aligned),
        "--finetuned",
        str(finetuned),
        "--out",
        str(tmp_path / "out"),
        "--questions",
        "4",
        "--prune-rate",
        "0.5",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "nlsr_report.json").read_text())
    assert len(report["modules"]) == 6 and "patched" in result.output
    assert load_adapter(tmp_path / "out").modules == load_adapter(finetuned).modules
    bad = CliRunner().invoke(main, [*args[:4], str(tmp_path / "nowhere"), *args[5:]])
    assert bad.exit_code == 1 and "no adapter_config.json" in bad.output
    on_cpu = CliRunner().invoke(main, [*args[:8], str(tmp_path / "cpu"), *args[9:], "--device", "cpu"])
    assert on_cpu.exit_code == 0, on_cpu.output
    assert (tmp_path / "cpu" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "out" / "adapter_model.safetensors"
    ).read_bytes()
    wrong = CliRunner().invoke(main, [*args, "--device", "warp:0"])
    assert wrong.exit_code != 0 and "is not a torch device" in wrong.output


def test_mixed_safety_data_draws_from_every_gate_source_never_the_evaluation_sets():
    """``safety_data="mixed"``: the refusals' questions come from the gate's harmful requests of every source;
    none holds an AdvBench held-out prompt or an AI-red-team objective (the evaluation's sets)."""
    from safetylock import data, sources
    from safetylock.nlsr import safety_questions

    texts, fit_sources = safety_questions(64, seed=0, kind="mixed")
    assert len(texts) == 64 and {"advbench", "redteam", "jailbreak"} <= set(fit_sources)
    evaluated = [*data.split_harmful(data.advbench(), seed=0).heldout, *sources.airt().prompts]
    assert not any(prompt in text for text in texts for prompt in evaluated)
    assert safety_questions(64, seed=0, kind="mixed") == (texts, fit_sources)  # seeded
    plain, plain_sources = safety_questions(64, seed=0)
    assert plain_sources == ["advbench"] and plain != texts
