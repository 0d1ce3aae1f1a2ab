"""Fuzz every loader with mutated real files (issue 15): a correct load or a named error.

Each test writes a real, small file with minipeft's own writer (GPT-2 and BERT checkpoints,
a LoRA adapter, a 4-bit file, optimizer state, a diffusion checkpoint, a training
checkpoint), lets hypothesis mutate it, and feeds it to the loader. The properties:

1. the outcome is a load or an exception of a named kind — ``ValueError``, ``TypeError``,
   ``KeyError`` or ``FileNotFoundError`` (``CheckpointError`` is a ValueError) — whose
   message names the file (its name appears in the message); ``json.JSONDecodeError``
   is a ValueError but does not name the file, so it may not escape, nor may
   ``MemoryError``, ``OverflowError``, ``RecursionError``, ``AttributeError``, …;
2. nothing hangs: each load runs under a ``SIGALRM`` watchdog (``LOAD_TIMEOUT_S``);
   inputs stay small, so a load that is still running after it is a hang or a huge
   allocation taken from a header's word;
3. a failed load writes nothing: the base model's weights and ``requires_grad`` flags
   (adapter loads), the optimizer's and the schedule's state (``load_state``) and the
   model, optimizer and progress record (the training checkpoint) are unchanged.

Mutations of safetensors files: the 8-byte header length, the JSON header (a tensor's
dtype, shape, offsets or name; an entry dropped, added or replaced by any JSON value; the
``__metadata__``, including the JSON configs minipeft keeps in it), truncated or extended
bodies, random byte flips. Mutations of JSON configs: a value replaced by another JSON type,
NaN/±Infinity/huge numbers, keys dropped or added, deep nesting, invalid UTF-8, truncation.

Examples per test: ``MAX_EXAMPLES`` (the whole file takes about 30 s on two cores).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import signal
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minipeft import backend
from minipeft.models.bert import BertConfig, BertModel
from minipeft.models.gpt2 import GPT2, GPT2Config
from minipeft.models.io import save_safetensors_atomic
from minipeft.nn.layers import Linear
from minipeft.nn.module import Module
from minipeft.optim import AdamW
from minipeft.optim.io import load_state, save_state
from minipeft.optim.schedules import get_cosine_schedule_with_warmup
from minipeft.peft import LoraConfig, PeftModel, get_peft_model
from minipeft.peft.io import CONFIG_NAME, WEIGHTS_NAME
from minipeft.quant.blockwise import load_4bit, quantize_4bit, save_4bit

MAX_EXAMPLES = 60
LOAD_TIMEOUT_S = 20  # generous: the first load of a kind may compile Numba kernels
NAMED = (ValueError, TypeError, KeyError, FileNotFoundError)
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # a fuzz in CI must not flake: the same examples every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------- the harness
class Hang(BaseException):
    """Raised by the watchdog inside a load that ran past LOAD_TIMEOUT_S."""


@contextlib.contextmanager
def watchdog(seconds: int):
    def fire(signum, frame):
        raise Hang(f"load still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def outcome(load, *names: str) -> Any:
    """Run ``load()``; return its result, or the named exception it raised (property 1, 2).

    ``names``: strings of which at least one must appear in an error's message (the file's
    name, its directory).
    """
    try:
        with watchdog(LOAD_TIMEOUT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load()
    except Hang as exc:
        pytest.fail(f"the loader hung: {exc}")
    except NAMED as exc:
        if isinstance(exc, json.JSONDecodeError):
            pytest.fail(f"json.JSONDecodeError escaped unnamed: {exc}")
        msg = str(exc)
        assert any(n in msg for n in names), (
            f"{type(exc).__name__} does not name the file (any of {names}): {msg}"
        )
        return exc
    except Exception as exc:
        pytest.fail(f"unnamed exception {type(exc).__name__}: {exc}")


def host_state(module: Module) -> dict[str, np.ndarray]:
    """Copies of every tensor, on the host (parameters may live on the device)."""
    return {k: np.array(backend.to_numpy(v), copy=True) for k, v in module.state_dict().items()}


def flags(module: Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in module.named_parameters()}


def assert_same_state(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys(), sorted(before.keys() ^ after.keys())
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def optimizer_snapshot(opt: AdamW) -> Any:
    sd = opt.state_dict()
    state = {
        i: {k: np.array(backend.to_numpy(v), copy=True) if hasattr(v, "shape") else v
            for k, v in e.items()}
        for i, e in sd["state"].items()
    }  # fmt: skip
    return state, copy.deepcopy(sd["param_groups"])


def assert_same_optimizer(before: Any, after: Any) -> None:
    (s0, g0), (s1, g1) = before, after
    assert g0 == g1
    assert s0.keys() == s1.keys()
    for i in s0:
        assert s0[i].keys() == s1[i].keys()
        for k in s0[i]:
            np.testing.assert_array_equal(s0[i][k], s1[i][k], err_msg=f"state[{i}][{k}]")


# ---------------------------------------------------------------------------- mutations
SMALL_INTS = st.sampled_from([0, 1, 2, 3, 7, 8, -1, 2**31, 2**32 + 1, 2**53, 2**63 - 1, 2**64])
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | SMALL_INTS
    | st.integers(-(10**30), 10**30)
    | st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 1.5, 10**400])
    | st.text(max_size=6)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def dumps(obj: Any) -> bytes:
    """JSON as Python writes it: NaN and ±Infinity included; 10**400 as a huge integer."""
    return json.dumps(obj, allow_nan=True).encode()


def mutate_json_bytes(data: st.DataObject, obj: Any, keys: list[str] | None = None) -> bytes:
    """A JSON object with one mutation, as bytes (may be invalid JSON or invalid UTF-8)."""
    obj = copy.deepcopy(obj)
    keys = keys if keys is not None else (sorted(obj) if isinstance(obj, dict) else [])
    kind = data.draw(
        st.sampled_from(["replace", "drop", "add", "deep", "utf8", "truncate", "root"]), "json kind"
    )
    if kind == "replace" and keys:
        obj[data.draw(st.sampled_from(keys), "key")] = data.draw(JSON_VALUES, "value")
    elif kind == "drop" and keys:
        obj.pop(data.draw(st.sampled_from(keys), "key"), None)
    elif kind == "add":
        obj[data.draw(st.text(max_size=8), "new key")] = data.draw(JSON_VALUES, "value")
    elif kind == "deep":
        depth = data.draw(st.sampled_from([70, 1000, 100_000]), "depth")
        raw = dumps(obj)
        key = data.draw(st.sampled_from(keys), "key") if keys else "deep"
        return raw[:-1] + b', "%s": ' % key.encode() + b"[" * depth + b"]" * depth + b"}"
    elif kind == "utf8":
        raw = dumps(obj)
        at = data.draw(st.integers(0, len(raw)), "at")
        return raw[:at] + data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[at:]
    elif kind == "truncate":
        raw = dumps(obj)
        return raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)), "cut")]
    elif kind == "root":
        return dumps(data.draw(JSON_VALUES, "root"))
    return dumps(obj)


def split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_safetensors(header_bytes: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header_bytes)) + header_bytes + body


DTYPES = st.sampled_from(
    ["F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "X", ""]
)
SHAPES = st.one_of(
    st.lists(st.integers(0, 9), max_size=3),
    st.lists(SMALL_INTS, max_size=3),
    JSON_VALUES,
)


def mutate_safetensors(
    data: st.DataObject, raw: bytes, meta_json_keys: tuple[str, ...] = ()
) -> bytes:
    """A safetensors file with one mutation (``meta_json_keys``: metadata values holding JSON)."""
    header, body = split_safetensors(raw)
    names = sorted(k for k in header if k != "__metadata__")
    kind = data.draw(
        st.sampled_from(
            ["length", "dtype", "shape", "offsets", "rename", "drop", "add", "entry", "metadata",
             "meta_json", "flip_header", "truncate", "extend", "flip_body"]
        ),
        "safetensors kind",
    )  # fmt: skip
    if kind == "length":
        n = data.draw(
            st.sampled_from([0, 1, 7, len(raw) - 8, 2**63, 2**64 - 1])
            | SMALL_INTS.filter(lambda v: 0 <= v < 2**64)
        )
        n = min(max(n, 0), 2**64 - 1)
        return struct.pack("<Q", n) + raw[8:]
    if kind in ("dtype", "shape", "offsets", "rename", "drop", "entry") and names:
        name = data.draw(st.sampled_from(names), "tensor")
        if kind == "dtype":
            header[name]["dtype"] = data.draw(DTYPES | JSON_VALUES, "dtype")
        elif kind == "shape":
            header[name]["shape"] = data.draw(SHAPES, "shape")
        elif kind == "offsets":
            b, e = header[name]["data_offsets"]
            header[name]["data_offsets"] = data.draw(
                st.sampled_from(
                    [[b, e + 1], [b + 1, e], [e, b], [b, b], [0, len(body)], [b, 2**64]]
                )
                | st.lists(SMALL_INTS, max_size=3)
                | JSON_VALUES,
                "offsets",
            )
        elif kind == "rename":
            new = data.draw(st.sampled_from(names) | st.text(max_size=12), "new name")
            header[new] = header.pop(name)
        elif kind == "drop":
            del header[name]
        else:
            header[name] = data.draw(JSON_VALUES, "entry")
    elif kind == "add":
        header[data.draw(st.text(max_size=12), "added")] = data.draw(
            st.fixed_dictionaries(
                {"dtype": DTYPES, "shape": SHAPES, "data_offsets": st.lists(SMALL_INTS, max_size=2)}
            )
            | JSON_VALUES,
            "added entry",
        )
    elif kind == "metadata":
        header["__metadata__"] = data.draw(JSON_VALUES, "metadata")
    elif kind == "meta_json" and meta_json_keys:
        meta = header.get("__metadata__") or {}
        key = data.draw(st.sampled_from(meta_json_keys), "metadata key")
        if key in meta:
            meta[key] = mutate_json_bytes(data, json.loads(meta[key])).decode("utf-8", "replace")
    elif kind == "flip_header":
        h = bytearray(dumps(header))
        for _ in range(data.draw(st.integers(1, 3), "flips")):
            i = data.draw(st.integers(0, len(h) - 1), "at")
            h[i] ^= 1 << data.draw(st.integers(0, 7), "bit")
        return join_safetensors(bytes(h), body)
    elif kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1), "cut")]
    elif kind == "extend":
        return raw + data.draw(st.binary(min_size=1, max_size=64), "tail")
    elif kind == "flip_body" and body:
        b = bytearray(body)
        for _ in range(data.draw(st.integers(1, 4), "flips")):
            i = data.draw(st.integers(0, len(b) - 1), "at")
            b[i] ^= 1 << data.draw(st.integers(0, 7), "bit")
        return join_safetensors(dumps(header), bytes(b))
    return join_safetensors(dumps(header), body)


def mutate_file(data: st.DataObject, f: Path, meta_json_keys: tuple[str, ...] = ()) -> None:
    """Rewrite ``f`` (a .safetensors or a .json file) with one mutation."""
    raw = f.read_bytes()
    f.write_bytes(
        mutate_safetensors(data, raw, meta_json_keys) if f.suffix == ".safetensors"
        else mutate_json_bytes(data, json.loads(raw))
    )  # fmt: skip


# ---------------------------------------------------------------------------- the files
GPT2_TINY = dict(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2)
BERT_TINY = dict(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=12, max_position_embeddings=8, type_vocab_size=2)  # fmt: skip


def tiny_gpt2(seed: int = 0) -> GPT2:
    backend.seed(seed)
    return GPT2(GPT2Config(**GPT2_TINY))


@pytest.fixture(scope="module")
def files():
    """Every real file once (module scope: hypothesis examples copy them, never rewrite)."""
    root = Path(tempfile.mkdtemp(prefix="fuzz_loaders_"))
    out: dict[str, Path] = {}
    # GPT-2 checkpoint
    out["gpt2"] = tiny_gpt2().save_pretrained(root / "gpt2")
    # BERT checkpoint (transformers' layout, with the pooler)
    backend.seed(0)
    bert = BertModel(BertConfig(**BERT_TINY))
    (root / "bert").mkdir()
    save_safetensors_atomic(
        root / "bert" / "model.safetensors", bert.state_dict(), {"format": "pt"}
    )
    (root / "bert" / "config.json").write_text(json.dumps({**BERT_TINY, "model_type": "bert"}))
    # LoRA adapter on GPT-2 (non-zero B so a wrong copy would show)
    pm = get_peft_model(
        tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data[...] = 0.5
    pm.save_pretrained(root / "adapter")
    out["adapter"] = root / "adapter"
    # 4-bit file, nested (double quantization) and plain
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    for nested in (False, True):
        packed, state = quantize_4bit(x, 64, "nf4", double_quant=nested)
        save_4bit(root / f"q4_{nested}.safetensors", packed, state)
        out[f"q4_{nested}"] = root / f"q4_{nested}.safetensors"
    # optimizer + schedule state
    _, opt, sched = optimizer_setup()
    out["optim"] = save_state(root / "optim.safetensors", opt, sched)
    yield out
    shutil.rmtree(root, ignore_errors=True)


def optimizer_setup(seed: int = 0):
    backend.seed(seed)
    model = Linear(3, 2)
    opt = AdamW(model.parameters(), lr=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, 2, 10)
    for _ in range(2):
        for p in model.parameters():
            p.grad = np.ones_like(backend.to_numpy(p.data))
        opt.step()
        sched.step()
    return model, opt, sched


def copy_dir(src: Path) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="fuzz_case_"))
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


@contextlib.contextmanager
def scratch(src: Path):
    d = copy_dir(src) if src.is_dir() else Path(tempfile.mkdtemp(prefix="fuzz_case_"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------- GPT-2
@FUZZ
@given(data=st.data(), target=st.sampled_from(["model.safetensors", "config.json"]))
def test_gpt2_from_pretrained(files, data, target):
    with scratch(files["gpt2"]) as d:
        mutate_file(data, d / target)
        got = outcome(lambda: GPT2.from_pretrained(d), target, str(d))
        if isinstance(got, GPT2):  # a load: the model the files describe, complete
            ref = tiny_gpt2()
            assert {k: v.shape for k, v in got.state_dict().items()}.keys() == (
                ref.state_dict().keys()
            )


# ---------------------------------------------------------------------------- BERT
@FUZZ
@given(data=st.data(), target=st.sampled_from(["model.safetensors", "config.json"]))
def test_bert_from_pretrained(files, data, target):
    with scratch(files["gpt2"].parent / "bert") as d:
        mutate_file(data, d / target)
        outcome(lambda: BertModel.from_pretrained(d), target, str(d))


# ---------------------------------------------------------------------------- adapters
@FUZZ
@given(data=st.data(), target=st.sampled_from([WEIGHTS_NAME, CONFIG_NAME]))
def test_peft_from_pretrained(files, data, target):
    with scratch(files["adapter"]) as d:
        mutate_file(data, d / target)
        base = tiny_gpt2()
        before, before_flags = host_state(base), flags(base)
        modules = [n for n, _ in base.named_modules()]
        got = outcome(lambda: PeftModel.from_pretrained(base, str(d)), target, str(d))
        if not isinstance(got, PeftModel):  # property 3: the base model is untouched
            assert_same_state(before, host_state(base))
            assert flags(base) == before_flags
            assert [n for n, _ in base.named_modules()] == modules


# ---------------------------------------------------------------------------- 4-bit
@FUZZ
@given(data=st.data(), nested=st.booleans())
def test_load_4bit(files, data, nested):
    src = files[f"q4_{nested}"]
    with scratch(src.parent / "none") as d:
        f = d / src.name
        f.write_bytes(mutate_safetensors(data, src.read_bytes(), ("minipeft.quant_state",)))
        outcome(lambda: load_4bit(f), src.name)


# ---------------------------------------------------------------------------- optimizer
@FUZZ
@given(data=st.data())
def test_optim_load_state(files, data):
    src = files["optim"]
    with scratch(src.parent / "none") as d:
        f = d / src.name
        f.write_bytes(mutate_safetensors(data, src.read_bytes(), ("minipeft_optim",)))
        _, opt, sched = optimizer_setup(seed=1)
        before, sched_before = optimizer_snapshot(opt), copy.deepcopy(sched.state_dict())
        got = outcome(lambda: load_state(f, opt, sched), src.name)
        if got is not None:  # property 3: a failed load leaves both untouched
            assert_same_optimizer(before, optimizer_snapshot(opt))
            assert sched.state_dict() == sched_before


# ---------------------------------------------------------------------------- diffusion
DIFF_TINY = dict(hidden=8, mlp_hidden=8, n_blocks=1, time_dim=4, T=10)


@FUZZ
@given(data=st.data())
def test_diffusion_load_checkpoint(files, data):
    from minipeft.diffusion import Denoiser, DiffusionConfig, load_denoiser, save_denoiser

    with scratch(files["gpt2"].parent / "none") as d:
        f = d / "denoiser.safetensors"
        backend.seed(0)
        save_denoiser(f, Denoiser(DiffusionConfig(**DIFF_TINY)), extra={"note": "tiny"})
        f.write_bytes(mutate_safetensors(data, f.read_bytes(), ("config", "extra")))
        outcome(lambda: load_denoiser(f), f.name)


# ---------------------------------------------------------------------------- training
@FUZZ
@given(
    data=st.data(),
    target=st.sampled_from(["trainable.safetensors", "optimizer.safetensors", "trainer.json"]),
)
def test_train_load_checkpoint(files, data, target):
    from minipeft.train import TrainResult, load_checkpoint, save_checkpoint

    with scratch(files["gpt2"].parent / "none") as d:
        model, opt, _ = optimizer_setup()
        result = TrainResult(steps=4, trainable_params=8, losses=[1.0, 0.5], peak_bytes=3)
        save_checkpoint(d / "ckpt", model, opt, result, 2)
        mutate_file(data, d / "ckpt" / target, ("minipeft_optim",))
        model, opt, _ = optimizer_setup(seed=1)
        fresh = TrainResult(steps=4, trainable_params=8, losses=[9.0])
        before = host_state(model), optimizer_snapshot(opt), copy.deepcopy(fresh)
        got = outcome(lambda: load_checkpoint(d / "ckpt", model, opt, fresh), target, "ckpt")
        if not isinstance(got, int):  # property 3: nothing restored from a bad checkpoint
            assert_same_state(before[0], host_state(model))
            assert_same_optimizer(before[1], optimizer_snapshot(opt))
            assert fresh == before[2]
        else:
            assert got >= 0


# ---------------------------------------------------------------------------- regressions
def test_header_shapes_not_backed_by_bytes_are_refused_before_allocating(files, tmp_path):
    """A header (and a config agreeing with it) may claim a tensor far larger than the file.

    Found by reading, not by the fuzz (it takes two consistent mutations): ``wte`` claimed
    (10**9, 8) with ``vocab_size`` 10**9 in config.json, so the sizes check passed and the
    model was built (32 GB) before the data were read.
    """
    d = copy_dir(files["gpt2"])
    header, body = split_safetensors((d / "model.safetensors").read_bytes())
    header["transformer.wte.weight"]["shape"] = [10**9, 8]
    (d / "model.safetensors").write_bytes(join_safetensors(dumps(header), body))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 10**9}))
    got = outcome(lambda: GPT2.from_pretrained(d), "model.safetensors")
    assert isinstance(got, ValueError) and "transformer.wte.weight" in str(got)
    shutil.rmtree(d)
