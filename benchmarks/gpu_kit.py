"""The GPU kit: what one lent GPU slot needs that its image lacks, cut into pieces one ``run`` call can carry.

The image has Python 3.12 and torch 2.11 (CUDA 13) but no vLLM and no network; a call carries at most 64 MiB.
The kit holds vLLM 0.24.0 (the release built for torch 2.11), the wheels in ``benchmarks/gpu_wheels.txt`` and
safetylock's own wheel built from this tree, as one tar cut into pieces of at most 46 MiB (a call carries 64 MiB, the
working tree included), one piece per folder
(``.gpu/p01``, ``.gpu/p02``, ...; the tar's sha256 beside the first). docs/gpu.md gives the calls that carry them
and ``benchmarks/gpu_check.sh`` assembles, checks and installs them there.

Run: python -m benchmarks.gpu_kit [--verify-only]   (make gpu-kit). Downloads are kept in .gpu/wheels.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".gpu"
WHEELS_LIST = Path(__file__).with_name("gpu_wheels.txt")
VLLM = "vllm==0.24.0"
PIECE_BYTES = 46 * 2**20  # with the working tree (13 MiB) a call stays under its 64 MiB
TAR, SHA = "kit.tar", "kit.sha256"
# The GPU image: CPython 3.12 on x86_64 glibc; the tags pip may take for it.
TAGS = ("manylinux_2_28", "manylinux_2_17", "manylinux2014", "manylinux_2_31")
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    arg for tag in TAGS for arg in ("--platform", f"{tag}_x86_64")
]


def requirements() -> list[str]:
    """vLLM and every pinned wheel of ``gpu_wheels.txt``."""
    pinned = [line.strip() for line in WHEELS_LIST.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [VLLM, *pinned]


def download(wheels: Path) -> None:
    """Every requirement for the GPU image (no dependencies resolved: the list is complete), then this tree's wheel."""
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "download", "--no-deps", *PLATFORM, "-d", str(wheels), *requirements()], check=True)
    for old in wheels.glob("safetylock-*.whl"):
        old.unlink()
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)], check=True)


def pack(wheels: Path, kit: Path = KIT, piece_bytes: int = PIECE_BYTES) -> tuple[str, list[Path]]:
    """Tar ``wheels`` (sorted, fixed metadata: the same wheels give the same bytes) and cut the tar into pieces,
    one per folder ``kit/pNN``; the tar's sha256 goes beside the first piece. Returns the sha256 and the pieces."""
    for old in kit.glob("p[0-9][0-9]"):
        shutil.rmtree(old)
    tar = kit / TAR

    def fixed(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as out:
        for wheel in sorted(wheels.glob("*.whl")):
            out.add(wheel, arcname=f"kit/{wheel.name}", filter=fixed)
    digest = hashlib.sha256()
    pieces = []
    with tar.open("rb") as source:
        while chunk := source.read(piece_bytes):
            digest.update(chunk)
            folder = kit / f"p{len(pieces) + 1:02d}"
            folder.mkdir()
            piece = folder / f"{TAR}.{len(pieces):02d}"
            piece.write_bytes(chunk)
            pieces.append(piece)
    tar.unlink()
    (pieces[0].parent / SHA).write_text(f"{digest.hexdigest()}  {TAR}\n")
    return digest.hexdigest(), pieces


def verify(kit: Path = KIT) -> str:
    """Join the pieces in order as the GPU side does and check the sha256 written beside the first."""
    pieces = sorted(kit.glob(f"p[0-9][0-9]/{TAR}.*"))
    if not pieces:
        raise click.ClickException(f"no kit pieces under {kit}: run `make gpu-kit`")
    too_big = [p for p in pieces if p.stat().st_size > PIECE_BYTES]
    if too_big:
        raise click.ClickException(f"pieces over {PIECE_BYTES} bytes: {too_big}")
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece.read_bytes())
    expected = (pieces[0].parent / SHA).read_text().split()[0]
    if digest.hexdigest() != expected:
        raise click.ClickException(f"the joined pieces' sha256 {digest.hexdigest()} is not the kit's {expected}")
    return expected


@click.command()
@click.option("--verify-only", is_flag=True, help="Only check that the pieces join to the recorded sha256.")
def main(verify_only: bool) -> None:
    if not verify_only:
        download(KIT / "wheels")
        pack(KIT / "wheels")
    digest = verify()
    pieces = sorted(KIT.glob("p[0-9][0-9]"))
    size = sum(p.stat().st_size for folder in pieces for p in folder.iterdir())
    click.echo(f"kit: {len(pieces)} pieces, {size / 2**20:.0f} MiB, sha256 {digest} (joined and checked)")
    click.echo("carry them one call each, back to back (docs/gpu.md): " + ", ".join(p.name for p in pieces))


if __name__ == "__main__":
    main()
