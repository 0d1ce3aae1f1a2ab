"""minipeft.io: atomic files and directories, and a kill test of the adapter directory."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from minipeft import io as mio
from minipeft.models.io import CheckpointError, load_safetensors, read_json


# ---------------------------------------------------------------------------- files
@pytest.mark.parametrize("target", ["/dev/null", "dir"])
def test_non_regular_target_refused(tmp_path, target):
    path = Path(target) if target.startswith("/") else tmp_path / target
    if not path.exists():
        path.mkdir()
    with pytest.raises(mio.OutputPathError, match="expected a regular file") as info:
        mio.atomic_write_text(path, "x")
    assert str(path) in str(info.value)
    with pytest.raises(mio.OutputPathError, match="--out: expected a regular file"):
        mio.check_file_target(path, "--out")
    if target.startswith("/"):
        assert Path("/dev/null").is_char_device()


def test_directory_target_must_be_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(mio.OutputPathError, match="expected a directory"):
        with mio.atomic_directory(tmp_path / "f"):
            pytest.fail("the body must not run")
    with pytest.raises(mio.OutputPathError, match="--export: expected a directory"):
        mio.check_directory_target(tmp_path / "f", "--export")
    with pytest.raises(mio.OutputPathError, match="--out: expected a file path, got an empty"):
        mio.check_file_target("", "--out")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        f = mio.atomic_write_text(tmp_path / "a.txt", "hi")
        with mio.atomic_directory(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask


def test_no_temporary_left_on_error(tmp_path):
    (tmp_path / "a.txt").write_text("old")

    def boom(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        mio.atomic_write(tmp_path / "a.txt", boom)
    with pytest.raises(RuntimeError, match="stop"):
        with mio.atomic_directory(tmp_path / "d") as d:
            (d / "x").write_text("1")
            raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old"


def test_symlink_to_a_file_is_kept(tmp_path):
    (tmp_path / "real.txt").write_text("old")
    (tmp_path / "link.txt").symlink_to("real.txt")
    mio.atomic_write_text(tmp_path / "link.txt", "new")
    assert (tmp_path / "link.txt").is_symlink()
    assert (tmp_path / "real.txt").read_text() == "new"


@pytest.mark.parametrize("exchange", [True, False])
def test_directory_swap_keeps_other_entries(tmp_path, monkeypatch, exchange):
    monkeypatch.setattr(mio, "USE_EXCHANGE", exchange)
    d = tmp_path / "d"
    with mio.atomic_directory(d) as t:
        (t / "weights").write_text("old")
        (t / "sub").mkdir()
        (t / "sub" / "other").write_text("kept")
    (d / "README.md").write_text("mine")
    with mio.atomic_directory(d) as t:
        (t / "weights").write_text("new")
    assert (d / "weights").read_text() == "new"
    assert (d / "README.md").read_text() == "mine"
    assert (d / "sub" / "other").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_fallback_window_is_repaired(tmp_path):
    """A writer killed between the fallback's two renames left only `.d.old-PID-…`: the
    next write through the helper puts the complete old directory back first."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "weights").write_text("old")
    (d / "keep").write_text("k")
    dead = _dead_pid()
    os.rename(d, tmp_path / f".d.old-{dead}-0123abcd")
    with mio.atomic_directory(d) as t:
        (t / "weights").write_text("new")
    assert (d / "weights").read_text() == "new" and (d / "keep").read_text() == "k"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def _dead_pid() -> int:
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=os._exit, args=(0,))
    p.start()
    p.join()
    return int(p.pid)


# ---------------------------------------------------------------------------- JSON guard
def test_deep_json_is_a_checkpoint_error(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"config\.json: JSON nested too deeply"):
        read_json(f)
    f.write_text('{"a":' * 100 + "1" + "}" * 100)
    with pytest.raises(CheckpointError, match="expected at most 64 levels, got 100"):
        read_json(f)


# ---------------------------------------------------------------------------- kill test
KILLS = 20


def _adapters():
    from minipeft.models.gpt2 import GPT2, GPT2Config
    from minipeft.peft import LoraConfig, get_peft_model

    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    models = []
    for alpha, value in ((8, 1.0), (32, 2.0)):
        pm = get_peft_model(
            GPT2(cfg), LoraConfig(r=4, lora_alpha=alpha, target_modules=["c_attn", "c_fc"])
        )
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.data[...] = value
        models.append(pm)
    return models


def _save_forever(models, directory: str) -> None:  # runs in the forked child
    i = 0
    while True:
        models[i % 2].save_pretrained(directory)
        i += 1


def _fingerprint(directory: Path) -> tuple[int, float]:
    """(lora_alpha, the single value of every weight); a mix has two values or a mismatch."""
    cfg = read_json(directory / "adapter_config.json")
    values = {float(v) for a in load_safetensors(directory / "adapter_model.safetensors").values()
              for v in np.unique(a)}  # fmt: skip
    assert len(values) == 1, f"weights of two saves mixed: {values}"
    return int(cfg["lora_alpha"]), values.pop()


def test_killed_saves_leave_old_or_new_adapter(tmp_path):
    """SIGKILL a process saving two adapters alternately over one directory, 20 times at
    random moments: after every kill the directory is one complete adapter."""
    models = _adapters()
    d = tmp_path / "adapter"
    models[0].save_pretrained(d)
    complete = {(8, 1.0), (32, 2.0)}
    assert _fingerprint(d) == (8, 1.0)
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    seen = set()
    start = time.perf_counter()
    for _ in range(KILLS):
        p = ctx.Process(target=_save_forever, args=(models, str(d)), daemon=True)
        p.start()
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        fp = _fingerprint(d)
        assert fp in complete, f"mixed adapter: lora_alpha={fp[0]} with weights {fp[1]}"
        seen.add(fp)
        assert time.perf_counter() - start < 120, "kill test over its time bound"
    # the next save cleans what the killed writers left beside the directory
    models[1].save_pretrained(d)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["adapter"]
    assert _fingerprint(d) == (32, 2.0)
    assert json.loads((d / "adapter_config.json").read_text())["lora_alpha"] == 32
