import pytest

from safetylock import models


def test_unknown_name_and_missing_directory(tmp_path):
    with pytest.raises(models.ModelError, match="neither a packaged model"):
        models.resolve("no-such-model")
    with pytest.raises(models.ModelError, match="unknown packaged model 'x'"):
        models.packaged("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match="has no config.json"):
        models.resolve(str(tmp_path / "empty"))


def test_wrong_hash_is_an_error_and_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETYLOCK_CACHE", str(tmp_path))
    fake = models.PackagedModel(
        name="tampered",
        parts=(models.PackagedFile("ollama-forge==1.0.1", "ollama_forge/data/abliterate_harmless_default.txt"),),
        size=1,
        sha256="0" * 64,
        description="a real download whose expected hash is wrong",
    )
    monkeypatch.setitem(models.REGISTRY, "tampered", fake)
    with pytest.raises(models.ModelError, match="does not verify"):
        models.fetch("tampered", progress=False)
    assert not fake.directory.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_local_directory_is_accepted(llama_dir):
    assert models.resolve(str(llama_dir)) == llama_dir
