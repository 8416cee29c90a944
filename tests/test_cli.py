import json

import pytest
from click.testing import CliRunner

from safetylock.cli import main
from safetylock.lockfile import load

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


def test_extract_writes_a_valid_lock(extracted):
    lock = load(extracted)
    assert lock.num_heads_locked == 2 and lock.default_alpha == 3.0
    assert lock.provenance["harmful"]["name"] == "harmful"


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
        (["attack", "harmful-7", "--lock", "x"], "unknown attack variant 'harmful-7'"),
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
