"""The vLLM OpenAI server with the plugin: steered chat completions, and fail-closed startup on a bad lock."""

import json
import math
import os
import subprocess
import sys

import psutil
import pytest

from safetylock.hf import load_model
from safetylock.lockfile import load
from safetylock.serve.server import ONEDNN_CACHE_ENV, chat, free_port, start_server, wait_healthy

from support import QUESTION, SERVER_ARGS, expected_chat, model_dir, tiny_lock

pytestmark = pytest.mark.engine  # real vLLM engines: the slow tier

ALPHA = 4.0


def server(model, lock_config: dict, port: int) -> subprocess.Popen:
    return start_server(model, port, lock_config, SERVER_ARGS, log=subprocess.PIPE)


@pytest.fixture(scope="module")
def lock_path(llama_dir, tmp_path_factory):
    model, tok = load_model(llama_dir)
    return tiny_lock(model, tok).save(tmp_path_factory.mktemp("server") / "llama.lock.safetensors")


def test_locked_server_steers_chat_completions(llama_dir, lock_path):
    port = free_port()
    proc = server(llama_dir, {"lock": str(lock_path), "alpha": ALPHA}, port)
    try:
        wait_healthy(proc, port, timeout=300)
        reply = chat(f"http://127.0.0.1:{port}/v1", str(llama_dir), QUESTION, 8, ignore_eos=True)
        # the server's own environment: vLLM's engine processes inherit it (their /proc environ is overwritten
        # when vLLM renames them, so it cannot be read there)
        onednn = psutil.Process(proc.pid).environ().get(ONEDNN_CACHE_ENV)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[0]
    assert reply == expected_chat(llama_dir, lock_path, ALPHA)
    assert reply != expected_chat(llama_dir, lock_path, None)
    assert f"lock {load(lock_path).fingerprint}" in log
    # oneDNN's per-shape primitive cache is off in the server unless the operator set it
    assert onednn == os.environ.get(ONEDNN_CACHE_ENV, "0")


def test_bad_locks_stop_the_server(llama_dir, lock_path, tiny_root, tokenizer, tmp_path):
    mistral = model_dir("mistral", tiny_root, tokenizer)
    model, tok = load_model(mistral)
    wrong_geometry = tiny_lock(model, tok).save(tmp_path / "mistral.lock.safetensors")
    nan_lock = load(lock_path)
    nan_lock.directions[0, 0] = math.nan
    (tmp_path / "nan.lock.safetensors").write_bytes(nan_lock.to_bytes())
    cases = {
        "geometry": (wrong_geometry, "lock does not fit this model: num_heads is 2 in the model but 4 in the lock"),
        "nan": (tmp_path / "nan.lock.safetensors", "tensor 'directions' holds non-finite values"),
        "missing": (tmp_path / "absent.lock.safetensors", "absent.lock.safetensors does not exist"),
    }
    procs = {name: server(llama_dir, {"lock": str(path)}, free_port()) for name, (path, _) in cases.items()}
    for name, proc in procs.items():
        try:
            log = proc.communicate(timeout=400)[0]
        finally:
            proc.kill()
        assert proc.returncode != 0, f"{name}: server kept running"
        assert cases[name][1] in log, f"{name}: message missing from server log:\n{log[-3000:]}"


def test_safetylock_serve_refuses_a_bad_lock_before_starting(llama_dir, tmp_path):
    from click.testing import CliRunner

    from safetylock.cli import main

    result = CliRunner().invoke(main, ["serve", str(llama_dir), "--lock", str(tmp_path / "none.safetensors")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_safetylock_serve_command_line(llama_dir, lock_path):
    from click.testing import CliRunner

    from safetylock.cli import main

    result = CliRunner().invoke(
        main,
        [
            "serve",
            str(llama_dir),
            "--lock",
            str(lock_path),
            "--alpha",
            "2",
            "--dry-run",
            "--",
            "--port",
            "9",
            "--additional-config",
            '{"other": 1}',
        ],
    )
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert "-m vllm.entrypoints.openai.api_server --model" in line and "--port 9" in line
    config = json.loads(line.split("--additional-config ")[1].split(" --port")[0].strip("'"))
    assert config == {"other": 1, "safetylock": {"lock": str(lock_path.resolve()), "alpha": 2.0}}


def test_safetylock_serve_policy_options(llama_dir, lock_path, monkeypatch):
    from click.testing import CliRunner

    from safetylock.cli import main

    monkeypatch.setenv("SAFETYLOCK_ADMIN_TOKEN", "t")
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    args = ["serve", str(llama_dir), "--lock", str(lock_path), "--allow-request-alpha", "--max-alpha", "8"]
    result = CliRunner().invoke(main, [*args, "--adapter-alpha", "support=6", "--dry-run"])
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("VLLM_PLUGINS=safetylock,safetylock_admin ") and "(dynamic)" in result.output
    config = json.loads(line.split("--additional-config ")[1].strip("'"))["safetylock"]
    assert config["allow_request_alpha"] is True and config["max_alpha"] == 8.0 and config["adapter_alpha"] == {"support": 6.0}
    bad = CliRunner().invoke(main, [*args, "--adapter-alpha", "support", "--dry-run"])
    assert bad.exit_code != 0 and "is not NAME=ALPHA" in bad.output
    low = CliRunner().invoke(main, [*args, "--min-alpha", "9", "--dry-run"])
    assert low.exit_code != 0 and "min_alpha 9.0 is above max_alpha 8.0" in low.output
    foreign = CliRunner().invoke(main, [*args, "--allow-foreign-base", "--dry-run"])
    line = foreign.output.strip().splitlines()[-1]
    assert json.loads(line.split("--additional-config ")[1].strip("'"))["safetylock"]["allow_foreign_base"] is True


def test_demo_serves_unsteered_and_locked_side_by_side(llama_dir, lock_path, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "safetylock.cli", "demo", "--model", str(llama_dir), "--lock", str(lock_path)]
        + ["--alpha", str(ALPHA), "--max-tokens", "4"],
        env={**os.environ, "SAFETYLOCK_CACHE": str(tmp_path), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "unsteered vs locked" in done.stdout and "What is the capital of France?" in done.stdout
    locked, plain = (tmp_path / "demo" / "locked.log").read_text(), (tmp_path / "demo" / "plain.log").read_text()
    assert "safetylock: locked 3 heads" in locked and f"lock {load(lock_path).fingerprint}" in locked
    assert "safetylock: locked" not in plain
