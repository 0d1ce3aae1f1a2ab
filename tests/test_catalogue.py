"""The catalogue of bad inputs: one table, one row per bad input to a public entry point.

Each row names the call, the exception type it must raise and a fragment of the message
(house style: the message names the argument and the expected and actual value). Rows that
touch files get a fresh directory with a saved GPT-2 and a saved LoRA adapter (``Env``).

"""

# ruff: noqa: E501  (the table keeps one row per line, so a row reads as one sentence)

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import minipeft
from minipeft import backend
from minipeft.autograd import ops
from minipeft.autograd.gradcheck import gradcheck
from minipeft.models.gpt2 import GPT2, GPT2Config
from minipeft.nn.module import Parameter
from minipeft.optim import SGD, AdamW
from minipeft.optim.schedules import (
    LambdaLR,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)
from minipeft.peft import IA3Config, LoraConfig, VeraConfig, get_peft_model
from minipeft.peft.adalora import AdaLoraConfig
from minipeft.peft.config import config_from_dict
from minipeft.peft.inject import PeftModel, UnknownAdapterError
from minipeft.peft.io import CheckpointError

CFG = {"vocab_size": 50, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2}
ADA = {"init_r": 4, "target_r": 2, "total_step": 10, "target_modules": ["c_attn"]}


class Env:
    """What a row may need: fresh models, a saved checkpoint and adapter, edited copies."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gpt2().save_pretrained(root / "gpt2")
        self.lora().save_pretrained(str(root / "adapter"))

    def gpt2(self) -> GPT2:
        backend.seed(0)
        return GPT2(GPT2Config(**CFG))

    def lora(self, name: str = "default") -> PeftModel:
        return get_peft_model(self.gpt2(), LoraConfig(r=2, target_modules=["c_attn"]), name)

    def params(self) -> list[Parameter]:
        return [Parameter(np.ones(3))]

    def sgd(self) -> SGD:
        return SGD(self.params(), lr=0.1)

    def _edited(self, source: str, file: str, changes: dict[str, Any]) -> Path:
        out = self.root / f"{source}-{len(list(self.root.iterdir()))}"
        shutil.copytree(self.root / source, out)
        d = json.loads((out / file).read_text())
        d.update(changes)
        (out / file).write_text(json.dumps(d))  # NaN and Infinity written as JSON reads them
        return out

    def adapter_with(self, **changes: Any) -> str:
        return str(self._edited("adapter", "adapter_config.json", changes))

    def gpt2_with(self, **changes: Any) -> Path:
        return self._edited("gpt2", "config.json", changes)


@dataclass(frozen=True)
class Row:
    id: str
    call: Callable[[Env], Any]
    error: type[BaseException]
    fragment: str


def _sum_sq(x):
    return ops.sum(x * x)


def _lora(**kw: Any) -> LoraConfig:
    return LoraConfig(**{"target_modules": ["c_attn"], **kw})


def _ada(**kw: Any) -> AdaLoraConfig:
    return AdaLoraConfig(**{**ADA, **kw})


def _merged_then_delete(env: Env) -> None:
    pm = env.lora("a")
    pm.add_adapter("b", _lora(r=2))
    pm.merge_adapter()
    pm.delete_adapter("a")


# fmt: off
ROWS = [
    # ---------------------------------------------------------------- LoraConfig
    Row("lora-no-targets", lambda e: LoraConfig(), ValueError, "target_modules: expected a list"),
    Row("lora-empty-targets", lambda e: LoraConfig(target_modules=[]), ValueError, "got none"),
    Row("lora-target-not-str", lambda e: _lora(target_modules=[1]), TypeError, "target_modules: expected non-empty strings"),
    Row("lora-target-dict", lambda e: _lora(target_modules={"c_attn": 1}), TypeError, "target_modules: expected a list of names or a regex string, got dict"),
    Row("lora-target-backref", lambda e: _lora(target_modules=r"(a)\1"), ValueError, "no backreferences"),
    Row("lora-r-zero", lambda e: _lora(r=0), ValueError, "r: expected an integer ≥ 1, got 0"),
    Row("lora-r-bool", lambda e: _lora(r=True), TypeError, "r: expected an integer ≥ 1, got True"),
    Row("lora-r-float", lambda e: _lora(r=8.0), TypeError, "r: expected an integer ≥ 1, got 8.0"),
    Row("lora-alpha-nan", lambda e: _lora(lora_alpha=math.nan), ValueError, "lora_alpha: expected a finite number"),
    Row("lora-alpha-inf", lambda e: _lora(lora_alpha=math.inf), ValueError, "lora_alpha: expected a finite number"),
    Row("lora-alpha-negative", lambda e: _lora(lora_alpha=-16), ValueError, "lora_alpha: expected a number in (0.0, inf), got -16"),
    Row("lora-alpha-str", lambda e: _lora(lora_alpha="16"), TypeError, "lora_alpha: expected a real number"),
    Row("lora-dropout-one", lambda e: _lora(lora_dropout=1.0), ValueError, "lora_dropout: expected a number in [0.0, 1.0)"),
    Row("lora-dropout-negative", lambda e: _lora(lora_dropout=-0.1), ValueError, "lora_dropout"),
    Row("lora-rslora-int", lambda e: _lora(use_rslora=1), TypeError, "use_rslora: expected true or false"),
    Row("lora-fifo-str", lambda e: _lora(fan_in_fan_out="yes"), TypeError, "fan_in_fan_out: expected true or false"),
    Row("lora-init-unknown", lambda e: _lora(init_lora_weights="xavier"), ValueError, "init_lora_weights: expected"),
    Row("lora-bias-unknown", lambda e: _lora(bias="some"), ValueError, "bias: expected 'none'"),
    Row("lora-rank-pattern-zero", lambda e: _lora(rank_pattern={"c_attn": 0}), ValueError, "rank_pattern['c_attn']: expected an integer ≥ 1"),
    Row("lora-rank-pattern-list", lambda e: _lora(rank_pattern=[("c_attn", 2)]), TypeError, "rank_pattern: expected a dict"),
    Row("lora-alpha-pattern-nan", lambda e: _lora(alpha_pattern={"c_attn": math.nan}), ValueError, "alpha_pattern['c_attn']: expected a finite number"),
    Row("lora-rank-pattern-lookahead", lambda e: _lora(rank_pattern={"(?=c)": 2}), ValueError, "rank_pattern"),
    Row("lora-unsupported-field", lambda e: LoraConfig.from_dict({"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]}), ValueError, "modules_to_save: minipeft does not support"),
    Row("lora-unknown-field", lambda e: LoraConfig.from_dict({"target_modules": ["c_attn"], "new_knob": 3}), ValueError, "new_knob: unknown adapter_config.json field"),
    Row("lora-wrong-peft-type", lambda e: LoraConfig.from_dict({"target_modules": ["c_attn"], "peft_type": "IA3"}), ValueError, "peft_type: expected 'LORA'"),
    Row("config-unknown-peft-type", lambda e: config_from_dict({"peft_type": "LOHA"}), ValueError, "peft_type: expected one of"),
    # ---------------------------------------------------------------- IA3Config
    Row("ia3-ff-not-subset", lambda e: IA3Config(target_modules=["c_attn"], feedforward_modules=["c_fc"]), ValueError, "feedforward_modules: expected a subset of target_modules"),
    Row("ia3-ff-not-str", lambda e: IA3Config(target_modules=["c_attn"], feedforward_modules=[3]), TypeError, "feedforward_modules: expected non-empty strings"),
    Row("ia3-init-str", lambda e: IA3Config(target_modules=["c_attn"], init_ia3_weights="true"), TypeError, "init_ia3_weights: expected true or false"),
    Row("ia3-lookbehind", lambda e: IA3Config(target_modules=r"(?<=h)\.c_attn"), ValueError, "target_modules: "),
    # ---------------------------------------------------------------- VeraConfig
    Row("vera-r-negative", lambda e: VeraConfig(target_modules=["c_attn"], r=-1), ValueError, "r: expected an integer ≥ 1, got -1"),
    Row("vera-key-negative", lambda e: VeraConfig(target_modules=["c_attn"], projection_prng_key=-1), ValueError, "projection_prng_key: expected an integer ≥ 0"),
    Row("vera-key-float", lambda e: VeraConfig(target_modules=["c_attn"], projection_prng_key=0.5), TypeError, "projection_prng_key: expected an integer"),
    Row("vera-d-initial-nan", lambda e: VeraConfig(target_modules=["c_attn"], d_initial=math.nan), ValueError, "d_initial: expected a finite number"),
    Row("vera-dropout-two", lambda e: VeraConfig(target_modules=["c_attn"], vera_dropout=2.0), ValueError, "vera_dropout"),
    Row("vera-save-projection-str", lambda e: VeraConfig(target_modules=["c_attn"], save_projection="no"), TypeError, "save_projection: expected true or false"),
    Row("vera-bias", lambda e: VeraConfig(target_modules=["c_attn"], bias="all"), ValueError, "bias: minipeft's VeRA supports only 'none'"),
    # ---------------------------------------------------------------- AdaLoraConfig
    Row("ada-no-total-step", lambda e: _ada(total_step=None), ValueError, "total_step: expected a positive step count, got None"),
    Row("ada-total-step-float", lambda e: _ada(total_step=10.5), TypeError, "total_step: expected an integer"),
    Row("ada-target-above-init", lambda e: _ada(target_r=8), ValueError, "target_r: the target rank 8 exceeds"),
    Row("ada-init-r-bool", lambda e: _ada(init_r=True, target_r=1), TypeError, "init_r: expected an integer"),
    Row("ada-beta1-one", lambda e: _ada(beta1=1.0), ValueError, "beta1: expected a number in (0.0, 1.0)"),
    Row("ada-beta2-nan", lambda e: _ada(beta2=math.nan), ValueError, "beta2: expected a finite number"),
    Row("ada-deltaT-zero", lambda e: _ada(deltaT=0), ValueError, "deltaT: expected an integer ≥ 1"),
    Row("ada-tinit-negative", lambda e: _ada(tinit=-1), ValueError, "tinit: expected an integer ≥ 0"),
    Row("ada-no-budget-phase", lambda e: _ada(tinit=6, tfinal=4), ValueError, "leave no budgeting phase"),
    Row("ada-orth-negative", lambda e: _ada(orth_reg_weight=-0.5), ValueError, "orth_reg_weight: expected a number in [0.0"),
    Row("ada-alpha-inf", lambda e: _ada(lora_alpha=math.inf), ValueError, "lora_alpha: expected a finite number"),
    Row("ada-dora", lambda e: _ada(use_dora=True), ValueError, "AdaLoRA supports none of these"),
    Row("ada-rank-pattern-length", lambda e: _ada(rank_pattern={"x.lora_E": [True]}), ValueError, "rank_pattern['x.lora_E']: expected init_r=4 booleans, got 1"),
    Row("ada-rank-pattern-ints", lambda e: _ada(rank_pattern={"x.lora_E": [1, 0, 1, 1]}), TypeError, "expected a list of booleans"),
    Row("ada-step-negative", lambda e: get_peft_model(e.gpt2(), _ada()).update_and_allocate(-1), ValueError, "global_step: expected an integer ≥ 0, got -1"),
    Row("ada-step-fraction", lambda e: get_peft_model(e.gpt2(), _ada()).update_and_allocate(2.5), TypeError, "global_step: expected an integer ≥ 0, got 2.5"),
    Row("ada-allocator-step", lambda e: get_peft_model(e.gpt2(), _ada()).rankallocator.update_and_allocate(-3), ValueError, "step: expected an integer ≥ 0, got -3"),
    Row("update-and-allocate-on-lora", lambda e: e.lora().update_and_allocate(1), TypeError, "is not AdaLoRA"),
    # ---------------------------------------------------------------- get_peft_model
    Row("gpm-not-a-module", lambda e: get_peft_model(object(), _lora()), TypeError, "model: expected a minipeft Module, got object"),
    Row("gpm-config-dict", lambda e: get_peft_model(e.gpt2(), {"r": 2}), TypeError, "config: expected a LoraConfig"),
    Row("gpm-no-match", lambda e: get_peft_model(e.gpt2(), _lora(target_modules=["zzz"])), ValueError, "matched no module"),
    Row("gpm-regex-no-match", lambda e: get_peft_model(e.gpt2(), _lora(target_modules="(.*.*)*!")), ValueError, "matched no module"),
    Row("gpm-embedding", lambda e: get_peft_model(e.gpt2(), _lora(target_modules=["wte"])), ValueError, "is a Embedding"),
    Row("gpm-layernorm", lambda e: get_peft_model(e.gpt2(), _lora(target_modules=["ln_f"])), ValueError, "only layers with a 2-D weight"),
    Row("gpm-name-dotted", lambda e: get_peft_model(e.gpt2(), IA3Config(target_modules=["c_attn"]), "task.v2"), ValueError, "adapter_name: expected 1 to 100 letters"),
    Row("gpm-name-parent", lambda e: get_peft_model(e.gpt2(), VeraConfig(r=2, target_modules=["c_attn"]), "../x"), ValueError, "got '../x'"),
    Row("gpm-name-absolute", lambda e: get_peft_model(e.gpt2(), _ada(), "/tmp/x"), ValueError, "got '/tmp/x'"),
    Row("gpm-name-empty", lambda e: get_peft_model(e.gpt2(), _lora(), ""), ValueError, "got ''"),
    Row("gpm-name-int", lambda e: get_peft_model(e.gpt2(), _lora(), 3), TypeError, "adapter_name: expected a string, got 3"),
    Row("gpm-name-shadows", lambda e: get_peft_model(e.gpt2(), _lora(), "forward"), ValueError, "'forward' is the name of a module attribute"),
    # ---------------------------------------------------------------- PeftModel methods
    Row("add-adapter-exists", lambda e: e.lora().add_adapter("default", _lora()), ValueError, "adapter_name: 'default' already exists"),
    Row("add-adapter-ia3-beside-lora", lambda e: e.lora().add_adapter("x", IA3Config(target_modules=["c_attn"])), ValueError, "only LoRA adapters can be added"),
    Row("add-adapter-bad-name", lambda e: e.lora().add_adapter("a/b", _lora()), ValueError, "got 'a/b'"),
    Row("set-adapter-unknown", lambda e: e.lora().set_adapter("other"), UnknownAdapterError, "adapter_name: no adapter 'other'; have ['default']"),
    Row("delete-adapter-unknown", lambda e: e.lora().delete_adapter("other"), ValueError, "no adapter 'other'"),
    Row("delete-adapter-only-one", lambda e: e.lora().delete_adapter("default"), ValueError, "'default' is the only adapter"),
    Row("delete-adapter-merged", _merged_then_delete, ValueError, "'a' is merged into"),
    Row("save-unknown-adapter", lambda e: e.lora().save_pretrained(str(e.root / "o"), ["x"]), UnknownAdapterError, "no adapter 'x'"),
    Row("save-escaping-name", lambda e: e.lora().save_pretrained(str(e.root / "o"), ["../x"]), UnknownAdapterError, "no adapter '../x'"),
    Row("save-merged", lambda e: (pm := e.lora(), pm.merge_adapter(), pm.save_pretrained(str(e.root / "o"))), ValueError, "unmerge before saving"),
    Row("load-adapter-exists", lambda e: e.lora().load_adapter(str(e.root / "adapter"), "default"), ValueError, "'default' already exists"),
    Row("load-adapter-bad-name", lambda e: e.lora().load_adapter(str(e.root / "adapter"), "a.b"), ValueError, "got 'a.b'"),
    # ---------------------------------------------------------------- PeftModel.from_pretrained
    Row("from-pretrained-no-dir", lambda e: PeftModel.from_pretrained(e.gpt2(), str(e.root / "none")), FileNotFoundError, "is not a directory"),
    Row("from-pretrained-no-weights", lambda e: PeftModel.from_pretrained(e.gpt2(), str(e.root / "gpt2")), FileNotFoundError, "adapter_config.json: no such JSON file"),
    Row("from-pretrained-bad-name", lambda e: PeftModel.from_pretrained(e.gpt2(), str(e.root / "adapter"), "x/y"), ValueError, "got 'x/y'"),
    Row("from-pretrained-alpha-nan", lambda e: PeftModel.from_pretrained(e.gpt2(), e.adapter_with(lora_alpha=math.nan)), ValueError, "adapter_config.json: lora_alpha: expected a finite number"),
    Row("from-pretrained-alpha-inf", lambda e: PeftModel.from_pretrained(e.gpt2(), e.adapter_with(lora_alpha=math.inf)), ValueError, "adapter_config.json: lora_alpha"),
    Row("from-pretrained-r-bool", lambda e: PeftModel.from_pretrained(e.gpt2(), e.adapter_with(r=True)), TypeError, "adapter_config.json: r: expected an integer"),
    Row("from-pretrained-r-mismatch", lambda e: PeftModel.from_pretrained(e.gpt2(), e.adapter_with(r=3)), CheckpointError, "adapter_model.safetensors"),
    Row("from-pretrained-peft-type", lambda e: PeftModel.from_pretrained(e.gpt2(), e.adapter_with(peft_type="LOHA")), ValueError, "adapter_config.json: peft_type: expected one of"),
    Row("from-pretrained-bias", lambda e: PeftModel.from_pretrained(e.gpt2(), e.adapter_with(bias="all")), ValueError, "bias: loading trained biases"),
    Row("from-pretrained-targets-regex", lambda e: PeftModel.from_pretrained(e.gpt2(), e.adapter_with(target_modules=r"(c)\1")), ValueError, "adapter_config.json: target_modules:"),
    # ---------------------------------------------------------------- GPT2.from_pretrained
    Row("gpt2-no-dir", lambda e: GPT2.from_pretrained(e.root / "none"), FileNotFoundError, "is not a directory"),
    Row("gpt2-n-layer-zero", lambda e: GPT2.from_pretrained(e.gpt2_with(n_layer=0)), ValueError, "config.json: n_layer: expected a positive integer"),
    Row("gpt2-eps-nan", lambda e: GPT2.from_pretrained(e.gpt2_with(layer_norm_epsilon=math.nan)), ValueError, "layer_norm_epsilon: expected a positive number"),
    Row("gpt2-width-mismatch", lambda e: GPT2.from_pretrained(e.gpt2_with(n_embd=32)), CheckpointError, "does not match"),
    Row("gpt2-int-dtype", lambda e: GPT2.from_pretrained(e.root / "gpt2", dtype=np.int32), TypeError, "dtype: expected one of"),
    # ---------------------------------------------------------------- optimizers
    Row("sgd-lr-negative", lambda e: SGD(e.params(), lr=-0.1), ValueError, "lr: expected a value in [0.0"),
    Row("sgd-lr-nan", lambda e: SGD(e.params(), lr=math.nan), ValueError, "lr: expected a finite number"),
    Row("sgd-lr-str", lambda e: SGD(e.params(), lr="0.1"), TypeError, "lr: expected a real number"),
    Row("sgd-momentum-negative", lambda e: SGD(e.params(), momentum=-0.9), ValueError, "momentum"),
    Row("sgd-weight-decay-inf", lambda e: SGD(e.params(), weight_decay=math.inf), ValueError, "weight_decay: expected a finite number"),
    Row("sgd-nesterov-no-momentum", lambda e: SGD(e.params(), nesterov=True), ValueError, "nesterov: needs momentum > 0"),
    Row("sgd-no-params", lambda e: SGD([]), ValueError, "params: got an empty parameter list"),
    Row("adamw-lr-bool", lambda e: AdamW(e.params(), lr=True), TypeError, "lr: expected a real number, got bool"),
    Row("adamw-beta1-one", lambda e: AdamW(e.params(), betas=(1.0, 0.999)), ValueError, "betas[0]: expected a value in [0.0, 1.0)"),
    Row("adamw-beta2-negative", lambda e: AdamW(e.params(), betas=(0.9, -0.1)), ValueError, "betas[1]"),
    Row("adamw-betas-triple", lambda e: AdamW(e.params(), betas=(0.9, 0.9, 0.9)), ValueError, "betas: expected a pair"),
    Row("adamw-eps-zero", lambda e: AdamW(e.params(), eps=0.0), ValueError, "eps: expected a value in (0.0"),
    Row("adamw-weight-decay-negative", lambda e: AdamW(e.params(), weight_decay=-0.01), ValueError, "weight_decay"),
    # ---------------------------------------------------------------- schedules
    Row("cosine-warmup-negative", lambda e: get_cosine_schedule_with_warmup(e.sgd(), -1, 10), ValueError, "num_warmup_steps: expected a non-negative integer"),
    Row("cosine-total-fraction", lambda e: get_cosine_schedule_with_warmup(e.sgd(), 1, 2.5), TypeError, "num_training_steps: expected a non-negative integer, got 2.5"),
    Row("cosine-cycles-nan", lambda e: get_cosine_schedule_with_warmup(e.sgd(), 1, 10, num_cycles=math.nan), ValueError, "num_cycles: expected a finite number ≥ 0, got nan"),
    Row("cosine-cycles-str", lambda e: get_cosine_schedule_with_warmup(e.sgd(), 1, 10, num_cycles="1"), TypeError, "num_cycles: expected a number"),
    Row("lambda-not-callable", lambda e: LambdaLR(e.sgd(), 3), TypeError, "lr_lambda: expected a callable or a list of 1 callables, got int"),
    Row("linear-last-epoch", lambda e: get_linear_schedule_with_warmup(e.sgd(), 1, 10, last_epoch=-2), ValueError, "last_epoch: expected an integer ≥ -1"),
    Row("lambda-no-optimizer", lambda e: LambdaLR(None, lambda s: 1.0), TypeError, "optimizer: expected a minipeft Optimizer"),
    # ---------------------------------------------------------------- gradcheck, backend
    Row("gradcheck-wrt-int", lambda e: gradcheck(_sum_sq, [np.arange(3)], wrt=[0]), TypeError, "wrt: input 0 has dtype int64, not floating"),
    Row("gradcheck-wrt-range", lambda e: gradcheck(_sum_sq, [np.ones(3)], wrt=[5]), ValueError, "wrt: expected indices of inputs in [0, 1), got [5]"),
    Row("gradcheck-eps-zero", lambda e: gradcheck(_sum_sq, [np.ones(3)], eps=0.0), ValueError, "eps: expected a finite step > 0, got 0.0"),
    Row("gradcheck-eps-nan", lambda e: gradcheck(_sum_sq, [np.ones(3)], eps=math.nan), ValueError, "eps: expected a finite step > 0, got nan"),
    Row("gradcheck-no-directions", lambda e: gradcheck(_sum_sq, [np.ones(3)], n_directions=0), ValueError, "n_directions: expected an integer ≥ 1, got 0"),
    Row("gradcheck-not-callable", lambda e: gradcheck(3, [np.ones(3)]), TypeError, "f: expected a function of Tensors, got int"),
    Row("set-backend-unknown", lambda e: minipeft.set_backend("torch"), ValueError, "backend: expected 'numpy' or 'cupy', got 'torch'"),
    Row("set-backend-none", lambda e: minipeft.set_backend(None), ValueError, "got None"),
]
# fmt: on


def test_every_row_has_a_unique_id():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("catalogue"))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_raises_a_named_error(row: Row, env: Env) -> None:
    with pytest.raises(row.error) as info:
        row.call(env)
    assert row.fragment in str(info.value), f"{row.id}: {info.value}"
