"""Checkpoint IO: safetensors load/save with validation, atomic writes, JSON config policy."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.models import io


def _listing(path):
    return sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------------------- safetensors
def test_round_trip_keeps_values_dtypes_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "a.bias": rng.standard_normal(4),  # float64
        "half": rng.standard_normal((2, 2)).astype(np.float16),
        "ids": np.arange(5, dtype=np.int64),
        "scalar": np.array(1.5, dtype=np.float32),
    }
    f = io.save_safetensors_atomic(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    assert _listing(tmp_path) == ["m.safetensors"]  # no temporary file left behind
    back = io.load_safetensors(f)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    assert io.read_safetensors_header(f)["__metadata__"] == {"format": "pt"}


def test_save_accepts_non_contiguous_arrays(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    io.save_safetensors_atomic(tmp_path / "t.safetensors", {"xt": x.T})
    np.testing.assert_array_equal(io.load_safetensors(tmp_path / "t.safetensors")["xt"], x.T)


@given(
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=4),
    dtype=st.sampled_from(["float32", "float64", "float16", "int32", "uint8"]),
)
def test_round_trip_property(tmp_path_factory, shapes, dtype):
    d = tmp_path_factory.mktemp("prop")
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": (rng.random(s) * 100).astype(dtype) for i, s in enumerate(shapes)}
    back = io.load_safetensors(io.save_safetensors_atomic(d / "x.safetensors", tensors))
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype


def test_expected_names_and_shapes_are_validated_all_at_once(tmp_path):
    f = tmp_path / "m.safetensors"
    io.save_safetensors_atomic(
        f, {"w": np.zeros((2, 3), np.float32), "extra": np.zeros(1, np.float32)}
    )
    expected = {"w": (3, 2), "b": (3,)}
    with pytest.raises(io.CheckpointError) as err:
        io.load_safetensors(f, expected)
    msg = str(err.value)
    assert str(f) in msg
    assert "missing tensors ['b']" in msg
    assert "unexpected tensors ['extra']" in msg
    assert "w: expected shape (3, 2), got (2, 3)" in msg
    # non-strict: unexpected names are tolerated, missing/mis-shaped are not
    with pytest.raises(io.CheckpointError, match="missing tensors") as err:
        io.load_safetensors(f, expected, strict=False)
    assert "unexpected" not in str(err.value)
    out = io.load_safetensors(f, {"w": (2, 3)}, strict=False)
    assert set(out) == {"w", "extra"}


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        io.load_safetensors(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(io.CheckpointError, match="not a safetensors file"):
        io.load_safetensors(bad)
    bad.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(io.CheckpointError, match="bad JSON header"):
        io.load_safetensors(bad)
    bad.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(io.CheckpointError, match="header length"):
        io.load_safetensors(bad)


def _write_raw(path, header, payload):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + payload)


def test_bfloat16_is_widened_exactly(tmp_path):
    # bfloat16 bit patterns of exactly representable values (sign|8-bit exponent|7-bit mantissa)
    bits = np.array([0x3F80, 0xC020, 0x3E20, 0x0000, 0x4300], dtype="<u2")
    want = np.array([1.0, -2.5, 0.15625, 0.0, 128.0], dtype=np.float32)
    f = tmp_path / "bf.safetensors"
    hdr = {"x": {"dtype": "BF16", "shape": [5], "data_offsets": [0, 10]}}
    _write_raw(f, hdr, bits.tobytes())
    out = io.load_safetensors(f)
    assert out["x"].dtype == np.float32
    np.testing.assert_array_equal(out["x"], want)
    np.testing.assert_array_equal(io.load_safetensors(f, dtype=np.float64)["x"], want)


def test_dtype_cast_requires_floating_tensors(tmp_path):
    f = tmp_path / "m.safetensors"
    io.save_safetensors_atomic(f, {"w": np.ones(2, np.float16), "i": np.ones(2, np.int32)})
    with pytest.raises(io.CheckpointError, match=r"expected floating tensors.*'i': 'I32'"):
        io.load_safetensors(f, dtype=np.float32)
    io.save_safetensors_atomic(f, {"w": np.ones(2, np.float16)})
    assert io.load_safetensors(f, dtype=np.float32)["w"].dtype == np.float32


def test_failed_save_leaves_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "m.safetensors"
    io.save_safetensors_atomic(f, {"w": np.ones(2, np.float32)})
    before = f.read_bytes()
    with pytest.raises(TypeError, match="dtype object"):
        io.save_safetensors_atomic(f, {"w": np.array([None, 1], dtype=object)})
    with pytest.raises(TypeError, match="metadata"):
        io.save_safetensors_atomic(f, {"w": np.ones(2)}, {"format": 1})

    def boom(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(f, boom)
    assert f.read_bytes() == before
    assert _listing(tmp_path) == ["m.safetensors"]


# ---------------------------------------------------------------------------- JSON
def test_json_round_trip_and_errors(tmp_path):
    f = io.write_json_atomic(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
    assert io.read_json(f) == {"a": [1, 2], "b": 1}
    assert _listing(tmp_path) == ["c.json"]
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        io.read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(io.CheckpointError, match="invalid JSON"):
        io.read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(io.CheckpointError, match="expected a JSON object, got list"):
        io.read_json(tmp_path / "list.json")


@dataclasses.dataclass
class _Cfg:
    width: int = 4
    act: str = "relu"

    def __post_init__(self):
        if self.width <= 0:
            raise ValueError(f"width: expected a positive integer, got {self.width}")


_POLICY = {"ignored_keys": {"architectures"}, "accepted_values": {"scale": (True,)}}


def test_config_policy(tmp_path):
    data = {"width": 8, "architectures": ["X"], "scale": True}
    cfg = io.dataclass_from_dict(_Cfg, data, **_POLICY)
    assert cfg == _Cfg(width=8, act="relu")
    with pytest.raises(io.CheckpointError, match=r"unknown key\(s\) \['rotary', 'zeta'\]"):
        io.dataclass_from_dict(_Cfg, {"width": 8, "zeta": 1, "rotary": 2}, **_POLICY)
    with pytest.raises(io.CheckpointError, match=r"scale=False is not supported"):
        io.dataclass_from_dict(_Cfg, {"scale": False}, **_POLICY)
    with pytest.raises(ValueError, match=r"c\.json: width: expected a positive integer"):
        io.dataclass_from_dict(_Cfg, {"width": -1}, source="c.json", **_POLICY)
    f = io.write_json_atomic(tmp_path / "config.json", {"width": 2, "act": "gelu"})
    assert io.read_json_config(f, _Cfg, **_POLICY) == _Cfg(2, "gelu")
    io.write_json_atomic(f, {"width": 2, "heads": 3})
    with pytest.raises(io.CheckpointError, match=r"config\.json: unknown key\(s\) \['heads'\]"):
        io.read_json_config(f, _Cfg, **_POLICY)
    with pytest.raises(TypeError, match="dataclass"):
        io.dataclass_from_dict(dict, {})
