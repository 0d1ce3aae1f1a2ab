"""The subcommands that moved into ``python -m minipeft`` (issue 15): ``pretrain-diffusion``
(was ``python -m minipeft.diffusion pretrain``) and ``compare`` (was ``python -m
minipeft.experiments.compare``). ``--help`` works, a bad argument is status 2 and one line
naming it, and the old module entry points run the same command."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_cli_errors import _fails  # rc 2, one line on stderr naming the argument


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "minipeft", "pretrain-diffusion", "--help"],
        ["-m", "minipeft", "compare", "--help"],
        ["-m", "minipeft.diffusion", "pretrain", "--help"],
        ["-m", "minipeft.experiments.compare", "--help"],
    ],
)
def test_help(argv):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout
    assert "--steps" in proc.stdout


@pytest.mark.parametrize(
    "argv, arg",
    [
        (["--steps", "0"], "--steps"),
        (["--seed", "-1"], "--seed"),
        (["--steps", "x"], "--steps"),
        ([], "--out"),
    ],
)
def test_pretrain_diffusion_bad_argument(capsys, tmp_path, argv, arg):
    out = [] if not argv else ["--out", str(tmp_path / "m.safetensors")]
    line = _fails(capsys, ["pretrain-diffusion", *out, *argv], arg)
    assert line.startswith("minipeft pretrain-diffusion: error:"), line


def test_pretrain_diffusion_out_checked_before_training(capsys, tmp_path):
    (tmp_path / "d").mkdir()
    _fails(capsys, ["pretrain-diffusion", "--out", str(tmp_path / "d")], "--out")


@pytest.mark.parametrize(
    "argv, arg",
    [
        (["--steps", "0"], "--steps"),
        (["--sweep-steps", "-2"], "--sweep-steps"),
        (["--methods", "lora", "nope"], "--methods"),
        (["--methods", "lora", "lora"], "--methods"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_compare_bad_argument(capsys, tmp_path, argv, arg):
    line = _fails(capsys, ["compare", "--out", str(tmp_path), *argv], arg)
    assert line.startswith("minipeft compare: error:"), line


def test_compare_render_bad_json(capsys, tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    _fails(capsys, ["compare", "--out", str(tmp_path / "o"), "--render", str(bad)], "--render")


@pytest.mark.parametrize(
    "argv, prefix",
    [
        (
            ["minipeft.diffusion", "pretrain", "--steps", "0"],
            "minipeft pretrain-diffusion: error: --steps:",
        ),
        (["minipeft.experiments.compare", "--subset", "0"], "minipeft compare: error: --subset:"),
    ],
)
def test_old_entry_points_are_the_new_commands(tmp_path, argv, prefix):
    cmd = [sys.executable, "-m", *argv, "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(prefix), proc.stderr
