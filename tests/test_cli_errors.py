"""The command line fails with status 2 and one line on stderr naming the argument."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minipeft.__main__ import main


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from minipeft.models.gpt2 import GPT2, GPT2Config

    d = tmp_path_factory.mktemp("gpt2")
    GPT2(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2)).save_pretrained(
        d
    )
    return d


@pytest.fixture(scope="module")
def bad_regex_adapter(gpt2_dir, tmp_path_factory):
    from minipeft.models.gpt2 import GPT2
    from minipeft.peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("adapter")
    pm = get_peft_model(GPT2.from_pretrained(gpt2_dir), LoraConfig(r=2, target_modules=["c_attn"]))
    pm.save_pretrained(d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = "(c_attn"  # a string is a regex in HF PEFT
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def _fails(capsys, argv, arg):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert arg in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def test_ids_overflow(capsys, gpt2_dir, tmp_path):
    out = tmp_path / "x.npy"
    line = _fails(
        capsys, ["logits", "--model", str(gpt2_dir), "--ids", "9" * 25, "--out", str(out)], "--ids"
    )
    assert "int64" in line


@pytest.mark.parametrize("kind", ["directory", "empty", "device", "under-a-file"])
def test_bad_out(capsys, gpt2_dir, tmp_path, kind):
    (tmp_path / "file").write_text("x")
    out = {
        "directory": str(tmp_path),
        "empty": "",
        "device": "/dev/null",
        "under-a-file": str(tmp_path / "file" / "x.npy"),
    }[kind]
    _fails(capsys, ["logits", "--model", str(gpt2_dir), "--ids", "1,2", "--out", out], "--out")
    assert (tmp_path / "file").read_text() == "x"


def test_unwritable_out_directory(capsys, gpt2_dir, tmp_path):
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        out = "/proc/minipeft-test/x.npy"  # root may write anywhere but here
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = str(ro / "x.npy")
    _fails(capsys, ["logits", "--model", str(gpt2_dir), "--ids", "1,2", "--out", out], "--out")


def test_out_checked_before_loading(capsys, tmp_path):
    """A bad --out is reported even though --model does not exist: it is checked first."""
    _fails(
        capsys,
        ["logits", "--model", str(tmp_path / "none"), "--ids", "1", "--out", "/dev/null"],
        "--out",
    )


def test_missing_model_and_ids_out_of_range(capsys, gpt2_dir, tmp_path):
    out = str(tmp_path / "x.npy")
    _fails(
        capsys, ["logits", "--model", str(tmp_path / "none"), "--ids", "1", "--out", out], "--model"
    )
    _fails(capsys, ["logits", "--model", str(gpt2_dir), "--ids", "1,999", "--out", out], "--ids")


def test_bad_regex_in_adapter_config(capsys, gpt2_dir, bad_regex_adapter, tmp_path):
    argv = ["logits", "--model", str(gpt2_dir), "--adapter", str(bad_regex_adapter)]
    _fails(capsys, [*argv, "--ids", "1,2", "--out", str(tmp_path / "x.npy")], "--adapter")


def test_deep_config_names_model(capsys, gpt2_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(gpt2_dir, d)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    line = _fails(
        capsys, ["logits", "--model", str(d), "--ids", "1", "--out", str(tmp_path / "x")], "--model"
    )
    assert "config.json" in line


def test_huge_n_positions_refused_before_allocating(gpt2_dir, tmp_path):
    import shutil

    from minipeft.models.gpt2 import GPT2
    from minipeft.models.io import CheckpointError

    d = tmp_path / "m"
    shutil.copytree(gpt2_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_positions"] = 10**12
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"n_positions=1000000000000 does not match"):
        GPT2.from_pretrained(d)


def test_unwritable_export(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    _fails(capsys, ["verify", "lora", "--export", str(tmp_path / "file")], "--export")
    _fails(capsys, ["verify", "lora", "--export", str(tmp_path / "file" / "sub")], "--export")


def test_argparse_errors_are_one_line(capsys):
    _fails(capsys, ["logits", "--ids", "1"], "--model")
    _fails(capsys, ["verify", "no-such-equation-*"], "PATTERN")


def test_embed_non_utf8_in_a_subprocess(tmp_path):
    """Bytes that are not UTF-8 on the command line: one line naming TEXT, no traceback."""
    cmd = [sys.executable, "-m", "minipeft", "embed", "--out", str(tmp_path / "e.npy")]
    proc = subprocess.run([*cmd, b"ab\xffc"], capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1 and "TEXT" in err[0] and "0xff" in err[0], err
    assert not (tmp_path / "e.npy").exists()


def test_internal_error_is_one_line_status_70(capsys, monkeypatch, gpt2_dir, tmp_path):
    from minipeft.cli import logits

    def bug(*args, **kwargs):
        raise AssertionError("a bug")

    monkeypatch.setattr(logits, "run_logits", bug)
    rc = main(["logits", "--model", str(gpt2_dir), "--ids", "1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 70 and len(err) == 1 and err[0].startswith("minipeft: internal error"), err
