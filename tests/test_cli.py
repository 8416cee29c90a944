import dataclasses
import json
import re

import pytest
import torch
from click.testing import CliRunner

from safetylock.cli import main
from safetylock.gate import POOL_DRAWS
from safetylock.hf import forward_precision
from safetylock.lockfile import load
from safetylock.sources import DEFAULT_GATE_DATA, GATE_DATA, Sizes, sizes_record

from support import QUESTIONS


@pytest.fixture(scope="module")
def extracted(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    questions = root / "harmful.jsonl"
    questions.write_text("\n".join(json.dumps({"prompt": q}) for q in QUESTIONS) + "\n")
    lock = root / "tiny.lock.safetensors"
    args = [
        "extract",
        "--model",
        str(llama_dir),
        "--out",
        str(lock),
        "--harmful",
        str(questions),
        "--questions",
        "16",
        "--top-k",
        "2",
        "--tokens",
        "3",
        "--alpha",
        "3",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return lock


def test_inspect_prints_the_gate_held_out_table(extracted, tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(extracted), "--plot", str(tmp_path / "heat.png")])
    assert result.exit_code == 0, result.output
    held = [line for line in result.output.splitlines() if line.startswith("  held out  ")]
    assert any("redteam" in line and "tpr" in line for line in held) and any("borderline" in line for line in held)
    assert "gate read   last token + attention over the request's tokens" in result.output  # the default read


def test_extract_writes_a_valid_lock(extracted):
    lock = load(extracted)
    assert lock.num_heads_locked == 2 and lock.default_alpha == 3.0
    assert lock.provenance["harmful"]["name"] == "harmful"
    # The gate is fitted by default, its layer chosen with every source held out in turn.
    heldout = {row["source"] for row in lock.gate.calibration["heldout_sources"]}
    assert {"harmful", "redteam", "borderline", "multiturn"} <= heldout and lock.gate.early_heads == "generated"
    # It reads the last token and, by default, an attention probe over the request's tokens (the mean of seeded fits).
    assert lock.gate.read == "attention" and lock.gate.calibration["pooling"]["draws"] == POOL_DRAWS
    assert lock.gate.calibration["precision"] == lock.provenance["precision"] == forward_precision("auto")  # both forwards
    assert lock.gate.calibration["data_sizes"] == sizes_record(GATE_DATA[DEFAULT_GATE_DATA])  # calibrate-gate rebuilds them


def test_inspect_prints_table_and_writes_heatmap(extracted, tmp_path):
    png = tmp_path / "heat.png"
    result = CliRunner().invoke(main, ["inspect", str(extracted), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "3 layers x 2 heads" in result.output and "val acc" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_shows_both(extracted, llama_dir):
    result = CliRunner().invoke(
        main, ["generate", "--model", str(llama_dir), "--lock", str(extracted), "--max-new-tokens", "4", "hello there"]
    )
    assert result.exit_code == 0, result.output
    assert "--- unlocked" in result.output and "--- locked (α=3.0)" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "missing.safetensors"], "lock file missing.safetensors does not exist"),
        (["extract", "--model", "nope", "--out", "x"], "neither a packaged model"),
        (["extract", "--out", "x", "--top-k", "0"], "Invalid value for '--top-k'"),
        (["generate", "--lock", "x", "--alpha", "nan", "p"], "Invalid value for '--alpha'"),
        (["models", "fetch", "gpt-17"], "'gpt-17' is not one of"),
        (["eval", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--enforce-eager"], "applies offline only"),
        (["eval", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--dtype", "bfloat16"], "--dtype applies offline"),
        (["eval", "--model", "m", "--dtype", "int8"], "Invalid value for '--dtype'"),
        (["attack", "harmful-7", "--lock", "x"], "unknown attack variant 'harmful-7'"),
        (["eval", "--model", "m", "--gated"], "--gated needs --lock"),
        (["calibrate-gate", "--lock", "missing.safetensors", "--out", "x"], "lock file missing.safetensors does not exist"),
        (["extract", "--out", "x", "--recipe", "own"], "Invalid value for '--recipe'"),
        (["extract", "--out", "x", "--gate-data", "all"], "Invalid value for '--gate-data'"),
        (["extract", "--out", "x", "--precision", "fp8"], "Invalid value for '--precision'"),
    ],
)
def test_bad_input_is_one_clear_error(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_wrong_geometry_lock_refused_by_generate(extracted, tiny_root, tokenizer):
    from support import model_dir

    mistral = model_dir("mistral", tiny_root, tokenizer)
    result = CliRunner().invoke(main, ["generate", "--model", str(mistral), "--lock", str(extracted), "p"])
    assert result.exit_code == 1
    assert "lock does not fit this model: num_heads is 4 in the model but 2 in the lock" in result.output


def test_extract_refuses_top_k_beyond_the_model_before_capturing(llama_dir, tmp_path, monkeypatch):
    def capture_ran(*args, **kwargs):
        raise AssertionError("capture ran before top_k was checked")

    monkeypatch.setattr("safetylock.pipeline.capture", capture_ran)
    out = tmp_path / "x.lock.safetensors"
    result = CliRunner().invoke(main, ["extract", "--model", str(llama_dir), "--out", str(out), "--top-k", "999"])
    assert result.exit_code == 1, result.output
    assert "top_k must be in 1..6 (the model has 6 heads), got 999" in result.output and "Traceback" not in result.output
    assert not out.exists()


def gated_lock_file(llama_dir, path):
    from safetylock.gate import Gate
    from safetylock.hf import load_model

    from support import model_lock

    model, _ = load_model(llama_dir)
    calibration = {"auroc": 0.95, "fpr": 0.05, "tpr": 0.8, "roc": [[0, 0], [0.05, 0.8], [1, 1]], "layer_auroc": {"1": 0.95}}
    return model_lock(model, Gate(1, torch.ones(model.config.hidden_size), 0.0, 1.0, calibration)).save(path)


def test_inspect_shows_the_gate_and_its_roc(llama_dir, tmp_path):
    path = gated_lock_file(llama_dir, tmp_path / "gated.lock.safetensors")
    result = CliRunner().invoke(main, ["inspect", str(path), "--plot", str(tmp_path / "heat.png")])
    assert result.exit_code == 0, result.output
    assert 'gate        layer 1, threshold 1, {"auroc": 0.95, "fpr": 0.05, "tpr": 0.8}' in result.output
    assert (tmp_path / "heat.gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_gated_refuses_a_lock_without_gate_before_starting(extracted, llama_dir, tmp_path):
    plain = dataclasses.replace(load(extracted), gate=None).save(tmp_path / "plain.lock.safetensors")
    result = CliRunner().invoke(main, ["serve", str(llama_dir), "--lock", str(plain), "--gated", "--dry-run"])
    assert result.exit_code == 1
    assert "has no gate (extract it without --no-gate)" in result.output and "Traceback" not in result.output


def test_serve_gated_dry_run_names_the_mode(llama_dir, tmp_path):
    path = gated_lock_file(llama_dir, tmp_path / "gated.lock.safetensors")
    args = ["serve", str(llama_dir), "--lock", str(path), "--gated", "--alpha", "4", "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "at alpha 4.0 (gated)" in result.output and '"gated": true' in result.output


def test_calibrate_gate_refuses_a_lock_without_gate(extracted, tmp_path):
    plain = dataclasses.replace(load(extracted), gate=None).save(tmp_path / "plain.lock.safetensors")
    out = tmp_path / "x.lock.safetensors"
    result = CliRunner().invoke(main, ["calibrate-gate", "--lock", str(plain), "--out", str(out)])
    assert result.exit_code == 1 and "has no gate" in result.output and not out.exists()


def test_calibrate_gate_refits_by_default_on_the_lock_s_own_questions(extracted, llama_dir, tmp_path):
    out = tmp_path / "served.lock.safetensors"
    args = ["calibrate-gate", "--model", str(llama_dir), "--lock", str(extracted), "--out", str(out)]
    result = CliRunner().invoke(main, args)  # the lock was extracted with its own questions, not AdvBench
    assert result.exit_code == 1 and "pass them with --harmful" in result.output and not out.exists()
    result = CliRunner().invoke(main, [*args, "--harmful", str(extracted.parent / "harmful.jsonl")])
    assert result.exit_code == 0, result.output
    base, served = load(extracted).gate, load(out).gate
    assert served.calibration["refit_on"] == f"served model {llama_dir}" and served.layer == base.layer
    assert not torch.equal(served.weight, base.weight)  # fit again on the model as served (no system prompt)
    assert served.read == "attention" and not torch.equal(served.pooling.query, base.pooling.query)  # both probes
    assert served.calibration["precision"] in ("float32", "bfloat16")


def test_calibrate_gate_rebuilds_the_data_the_lock_s_gate_was_fit_on(extracted, llama_dir, tmp_path):
    from safetylock import data
    from safetylock.gate import benign_calibration

    questions = data.load_prompt_file(extracted.parent / "harmful.jsonl")
    lock = load(extracted)
    topics = Sizes(topics=20)
    calibration = {**lock.gate.calibration, "data_sizes": sizes_record(topics)}
    with_topics = dataclasses.replace(lock, gate=dataclasses.replace(lock.gate, calibration=calibration))
    path = with_topics.save(tmp_path / "topics.lock.safetensors")
    out = tmp_path / "served.lock.safetensors"
    args = ["calibrate-gate", "--model", str(llama_dir), "--lock", str(path), "--out", str(out), "--threshold-only"]
    result = CliRunner().invoke(main, [*args, "--harmful", str(extracted.parent / "harmful.jsonl")])
    assert result.exit_code == 0, result.output
    benign = len(benign_calibration(questions, sizes=topics))
    assert benign > len(benign_calibration(questions)) and load(out).gate.calibration["served_benign"] == benign


def test_eval_refuses_a_suite_that_shares_prompts_with_the_lock_before_starting_an_engine(extracted, llama_dir, tmp_path):
    from safetylock.sources import redteam

    lock = load(extracted)
    assert len(lock.provenance["fit_prompts"]) == lock.provenance["split"]["extraction_used"]
    assert len(lock.gate.calibration["fit_prompts"]) > 1000
    suite = tmp_path / "redteam.jsonl"
    suite.write_text("".join(json.dumps({"prompt": p, "source": "redteam"}) + "\n" for p in redteam().prompts))
    out = tmp_path / "run.json"
    args = ["eval", "--model", str(llama_dir), "--lock", str(extracted), "--gated", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--suite", f"harmful={suite}", "--count", "400"])
    assert result.exit_code == 1 and not out.exists()
    shared = re.search(rf"shares (\d+) of its \d+ prompts with the gate of lock {lock.fingerprint}", result.output)
    assert shared and int(shared[1]) >= 300  # the gate's 300 red-team requests (and multi-turn ones ending in one)
    assert "Traceback" not in result.output
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n")
    result = CliRunner().invoke(main, [*args, "--suite", f"harmful={questions}", "--count", "400"])
    assert result.exit_code == 1 and f"with the probes of lock {lock.fingerprint}" in result.output


def test_prompts_of_a_source_the_gate_did_not_see_are_labelled_in_distribution(extracted):
    from safetylock.overlap import check, fingerprint, lock_fits
    from safetylock.sources import redteam

    fits = lock_fits(load(extracted))
    unseen = [p for p in redteam().prompts if fingerprint(p) not in fits[1].prompts]
    assert 0 < len(unseen) < 37  # 337 objectives, 300 of them fit on (some again as a chat's last turn)
    assert check("redteam-rest", unseen, ["redteam"], fits) == {fits[1].what: ["redteam"]}


def _file_size_limit(limit: int):
    """In the child before exec: writes beyond ``limit`` bytes fail with EFBIG, as on a full disk."""

    def apply() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_extract_that_cannot_write_leaves_no_partial_lock(extracted, llama_dir, tmp_path):
    """The lock file's write fails half way (the OS refuses bytes past a file-size limit, as a full disk does):
    one-line error naming the file, exit code 1, and nothing left in the output folder."""
    import subprocess
    import sys

    out = tmp_path / "out" / "tiny.lock.safetensors"
    assert extracted.stat().st_size > 4096  # the limit cuts the write in the middle
    questions = extracted.parent / "harmful.jsonl"
    args = ["extract", "--model", str(llama_dir), "--out", str(out), "--harmful", str(questions)]
    args += ["--questions", "16", "--top-k", "2", "--tokens", "3", "--alpha", "3", "--gate-read", "last"]  # quicker
    result = subprocess.run(
        [sys.executable, "-m", "safetylock.cli", *args],
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(4096),
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"Error: cannot write lock file {out}: File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(out.parent.iterdir()) == []


def test_extract_fits_the_gate_on_operator_requests_too_and_calibrate_gate_asks_for_them(llama_dir, tmp_path):
    from safetylock.sources import load_requests

    questions = tmp_path / "harmful.jsonl"
    questions.write_text("\n".join(json.dumps({"prompt": q}) for q in QUESTIONS) + "\n")
    mine = tmp_path / "ours.jsonl"
    rows = [
        {"prompt": f"Find the home address of my coworker number {i}.", "harmful": True, "source": "ours"} for i in range(8)
    ]
    rows += [
        {"prompt": f"Suggest a thank-you gift for my coworker number {i}.", "harmful": False, "source": "ours"}
        for i in range(8)
    ]
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lock_path = tmp_path / "ours.lock.safetensors"
    base = ["--model", str(llama_dir), "--harmful", str(questions)]
    args = ["extract", *base, "--out", str(lock_path), "--questions", "8", "--top-k", "2", "--tokens", "3"]
    result = CliRunner().invoke(main, [*args, "--no-gate", "--gate-requests", str(mine)])
    assert result.exit_code == 2 and "--gate-requests fits the gate: drop --no-gate" in result.output
    result = CliRunner().invoke(main, [*args, "--gate-requests", str(mine)])
    assert result.exit_code == 0, result.output
    calibration = load(lock_path).gate.calibration
    assert calibration["operator_requests"]["count"] == 16 and calibration["operator_requests"]["sources"] == ["ours"]
    assert "ours" in calibration["data"] and calibration["firing_by_source"]["ours"]["benign"] is not None
    out = tmp_path / "served.lock.safetensors"
    calibrate = ["calibrate-gate", *base, "--lock", str(lock_path), "--out", str(out), "--threshold-only"]
    result = CliRunner().invoke(main, calibrate)
    assert result.exit_code == 1 and "pass the same file with --gate-requests" in result.output and not out.exists()
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    result = CliRunner().invoke(main, [*calibrate, "--gate-requests", str(other)])
    assert result.exit_code == 1 and "other requests than the 16" in result.output and not out.exists()
    result = CliRunner().invoke(main, [*calibrate, "--gate-requests", str(mine)])
    assert result.exit_code == 0, result.output
    from safetylock import data
    from safetylock.gate import benign_calibration

    prompts = data.load_prompt_file(questions)
    with_ours = len(benign_calibration(prompts, operator=load_requests(mine)))
    assert with_ours == len(benign_calibration(prompts)) + 2  # a quarter of the 8 benign ones
    assert load(out).gate.calibration["served_benign"] == with_ours


def test_extract_with_the_last_token_read_and_calibrate_gate_keep_the_read(llama_dir, tmp_path):
    """``--gate-read last``: the lock's gate reads the last prompt token alone, ``inspect`` says so, and the gate
    refit on a served model (``calibrate-gate``) keeps the read; ``--no-gate`` with it is a usage error."""
    questions = tmp_path / "harmful.jsonl"
    questions.write_text("\n".join(json.dumps({"prompt": q}) for q in QUESTIONS) + "\n")
    lock_path = tmp_path / "last.lock.safetensors"
    base = ["--model", str(llama_dir), "--harmful", str(questions)]
    args = ["extract", *base, "--out", str(lock_path), "--questions", "8", "--top-k", "2", "--tokens", "3"]
    result = CliRunner().invoke(main, [*args, "--no-gate", "--gate-read", "last"])
    assert result.exit_code == 2 and "--gate-read fits the gate: drop --no-gate" in result.output
    result = CliRunner().invoke(main, [*args, "--gate-read", "last", "--precision", "float32"])
    assert result.exit_code == 0, result.output
    lock = load(lock_path)
    assert lock.gate.read == "last" and lock.gate.pooling is None and "pooling" not in lock.gate.calibration
    assert lock.provenance["precision"] == lock.gate.calibration["precision"] == "float32"
    shown = CliRunner().invoke(main, ["inspect", str(lock_path), "--plot", str(tmp_path / "heat.png")])
    assert "gate read   the last prompt token" in shown.output
    out = tmp_path / "served.lock.safetensors"
    result = CliRunner().invoke(main, ["calibrate-gate", *base, "--lock", str(lock_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    refit = load(out).gate
    assert refit.read == "last" and refit.pooling is None and refit.calibration["refit_on"]
