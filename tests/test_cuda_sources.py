"""Every CUDA source in minipeft/kernels/cuda compiles with nvcc for sm_80 and sm_90,
without a single warning (``-Werror all-warnings``; any diagnostic text also fails).

Device code only (``-cubin``), as NVRTC compiles it for ``cupy.RawModule``. Generic over
files: a new ``.cu`` is covered by adding it. Skipped when nvcc is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from minipeft.kernels.cuda import sources

ARCHS = ("sm_80", "sm_90")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in ("/usr/local/cuda/bin/nvcc",):
        if Path(cand).is_file():
            return cand
    return None


NVCC = _nvcc()
SOURCES = sources()


def test_there_are_sources():
    assert any(p.name == "quant4.cu" for p in SOURCES)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_compiles_without_warnings(src: Path, arch: str, tmp_path: Path):
    cmd = [
        NVCC,
        "-cubin",
        f"-arch={arch}",
        "--std=c++17",
        "-Werror",
        "all-warnings",
        "-o",
        str(tmp_path / f"{src.stem}_{arch}.cubin"),
        str(src),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    diagnostics = (out.stdout + out.stderr).strip()
    assert out.returncode == 0, f"{' '.join(cmd)}\n{diagnostics}"
    assert diagnostics == "", f"nvcc printed diagnostics for {src.name} ({arch}):\n{diagnostics}"
    assert (tmp_path / f"{src.stem}_{arch}.cubin").stat().st_size > 0
