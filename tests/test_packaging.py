"""The wheel users install holds every module of the project (an editable checkout would hide a missing one)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"safetylock": "safetylock", "plugins/vllm_hook": "safetylock_vllm", "probes": "safetylock_probes"}


def test_wheel_holds_every_module_and_probe_file(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("safetylock-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{package}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, package in SOURCES.items()
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".json") and "__pycache__" not in path.parts
    }
    assert expected - shipped == set()
    entry_points = next(name for name in shipped if name.endswith("entry_points.txt"))
    assert "safetylock = safetylock_vllm:register" in zipfile.ZipFile(wheel).read(entry_points).decode()
