"""``python -m minipeft gpu-check``: one line and status 2 without a device; on the strict
CuPy stand-in (``PYTHONPATH=tests/standin``) the whole command runs — kernels through the
CPU emulation of the CUDA built-ins — and writes its report (timings there mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from device import STANDIN_DIR, real_cupy_device


@pytest.mark.skipif(real_cupy_device(), reason="this machine has a GPU: gpu-check would run")
def test_without_a_device_it_says_why_in_one_line_and_exits_2(tmp_path):
    code = (
        "import sys; sys.modules['cupy'] = None\n"  # CuPy absent, even where it is installed
        "from minipeft.__main__ import main\n"
        f"sys.exit(main(['gpu-check', '--out', {str(tmp_path)!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: CuPy is not installed"), out.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_the_command_runs_end_to_end_on_the_standin(tmp_path):
    cmd = [sys.executable, "-m", "minipeft", "gpu-check", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(STANDIN_DIR)}  # `import cupy` finds the stand-in
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["standin"] is True
    rows = {r["figure"]: r for r in report["figures"]}
    assert set(rows) == {"copy bandwidth", "dequantize", "gemv", "sgmv", "gpt2_lora_step"}
    assert not [r for r in report["figures"] if "error" in r], report["figures"]
    for name in ("dequantize", "gemv", "sgmv"):
        assert isinstance(rows[name]["value"], float) and rows[name]["value"] > 0
    assert "meaningless" in (tmp_path / "gpu-check.md").read_text()
