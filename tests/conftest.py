"""Session fixtures: the tiny models (head_dim 64) and their tokenizer, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import ARCHITECTURES, build_tokenizer, model_dir


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_root):
    return build_tokenizer(tiny_root / "tokenizer")


@pytest.fixture(scope="session", params=sorted(ARCHITECTURES))
def tiny_model_dir(request, tiny_root, tokenizer) -> Path:
    return model_dir(request.param, tiny_root, tokenizer)


@pytest.fixture(scope="session")
def llama_dir(tiny_root, tokenizer) -> Path:
    return model_dir("llama", tiny_root, tokenizer)
