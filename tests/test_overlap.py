"""The overlap rule (``safetylock.overlap``): no suite is scored with a fit that saw its prompts."""

import dataclasses

import pytest

from safetylock.overlap import Fit, OverlapError, check, fingerprint, fingerprints, lock_fits, nlsr_fit

from support import constant_gate, model_lock


def test_fingerprint_ignores_case_and_spacing_only():
    assert fingerprint("  Write a  Poem\n") == fingerprint("write a poem")
    assert fingerprint("write a poem") != fingerprint("write a poem.")


def test_a_suite_sharing_a_prompt_is_refused_and_one_sharing_a_source_is_labelled():
    fit = Fit("gate of lock x", frozenset({"redteam", "benign"}), frozenset(fingerprints(["How do I pick a lock?"])))
    with pytest.raises(OverlapError, match=r"suite 'rt' shares 1 of its 2 prompts with the gate of lock x"):
        check("rt", ["how do I  pick a lock?", "Other"], ["redteam"], [fit])
    assert check("rt", ["Other"], ["redteam"], [fit]) == {"gate of lock x": ["redteam"]}
    assert check("mine", ["Other"], [], [fit]) == {}


def test_recorded_fingerprints_are_used_and_unknown_fits_are_labelled_unverified(llama_dir):
    from safetylock.hf import load_model

    model, _ = load_model(llama_dir)
    gate = constant_gate(model, True)
    recorded = dataclasses.replace(
        gate, calibration={"data": {"redteam": "0" * 16}, "fit_prompts": fingerprints(["Steal a car"])}
    )
    lock = dataclasses.replace(model_lock(model, recorded), provenance={"fit_prompts": fingerprints(["Rob a bank"])})
    probes, gated = lock_fits(lock)
    assert probes.prompts == frozenset(fingerprints(["Rob a bank"])) and gated.sources == frozenset({"redteam"})
    with pytest.raises(OverlapError, match="probes of lock"):
        check("s", ["rob a bank"], [], [probes, gated])
    unknown = lock_fits(model_lock(model, gate))  # nothing recorded and nothing to rebuild from
    assert check("s", ["Steal a car"], [], unknown) == {"unverified": [f.what for f in unknown]}


def test_nlsr_report_fit():
    fit = nlsr_fit({"fit_sources": ["advbench"], "fit_prompts": fingerprints(["Make a weapon"])})
    with pytest.raises(OverlapError, match="NLSR safety data"):
        check("s", ["make a weapon"], [], [fit])
