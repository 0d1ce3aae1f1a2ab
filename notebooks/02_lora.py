# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · LoRA: the quick start made right, counts, the fused backward, merge, fine-tuning
#
# Follows **lecture 23, §0 (quick start), §1.2 (multi-task LoRA), §3.1 (LoRA theory) and
# §3.6 (the LoRA backward)**, with the corrections of `ERRATA.md` items 5 and 6. The
# derivation is `derivations/lora.md`; the code `minipeft/peft/lora.py`; the registered
# checks `python -m minipeft verify lora`.
#
# Convention (PyTorch / HF PEFT): X is (N, in), W₀ is (out, in), H = X·W₀ᵀ + s·(X·Aᵀ)·Bᵀ
# with A (r, in), B (out, r), s = α/r. Every equation cell ends with an assertion.
#
# It runs on the NumPy backend by default; `MINIPEFT_BACKEND=cupy` runs the layers and the
# training on a GPU. Results come back to the host explicitly (`.numpy()`, `to_numpy`) where
# they meet the NumPy formulas, are printed or plotted.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minipeft
from minipeft import backend, tensor
from minipeft.autograd.gradcheck import gradcheck
from minipeft.autograd.tensor import Tensor, no_grad
from minipeft.backend import to_numpy
from minipeft.models.gpt2 import GPT2, GPT2Config
from minipeft.nn import Linear
from minipeft.peft import LoraConfig, LoraLayer, get_peft_model, lora_linear
from minipeft.peft.counts import lecture_errata5, lora_reduction, multitask_reduction

print("backend:", minipeft.get_backend())
backend.seed(0)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The quick start, made right (ERRATA 6)
#
# The lecture's three-line quick start initializes **B random and A = 0**; its text and the
# paper (and HF PEFT) initialize **A random (Kaiming-uniform) and B = 0**. Both give ΔW = 0,
# so the model starts unchanged — but the first gradients differ:
# ∂L/∂A = s·(G·B)ᵀ·X vanishes when B = 0, and ∂L/∂B = s·Gᵀ·(X·Aᵀ) vanishes when A = 0.

# %%
with backend.dtype_policy("float64"):
    layer = LoraLayer(Linear(16, 8))
    layer.add_adapter("paper", r=4, lora_alpha=8)  # A Kaiming-uniform, B = 0
    layer.add_adapter("lecture", r=4, lora_alpha=8, init_lora_weights="lecture")  # A = 0
x = tensor(rng.standard_normal((32, 16)))
target = rng.standard_normal((32, 8))
first_grads = {}
for name in ("paper", "lecture"):
    layer.set_adapter(name)
    layer.zero_grad()
    np.testing.assert_array_equal(layer(x).numpy(), layer.base_layer(x).numpy())  # ΔW = 0
    ((layer(x) - tensor(target)) ** 2).mean().backward()
    ga, gb = (to_numpy(m[name].weight.grad) for m in (layer.lora_A, layer.lora_B))
    first_grads[name] = (np.abs(ga).max(), np.abs(gb).max())
    print(f"{name:8s} init: max|∂L/∂A| = {first_grads[name][0]:.3e}   "
          f"max|∂L/∂B| = {first_grads[name][1]:.3e}")  # fmt: skip
assert first_grads["paper"][0] == 0 and first_grads["paper"][1] > 0
assert first_grads["lecture"][1] == 0 and first_grads["lecture"][0] > 0

# %% [markdown]
# ## 2. Parameter counts, computed (ERRATA 5)
#
# One d×k matrix: full fine-tuning trains d·k entries, LoRA r·(d + k); the reduction is
# d·k / (r·(d + k)) = d/(2r) for a square matrix. GPT-3's d = k = 12,288 with r = 4 gives
# **1,536×**, not 6,144×; three tasks on d = k = 512, r = 8 give ≈ **2.7×**, not 24×.

# %%
for row in lecture_errata5():
    mark = "ok " if row["right"] else "WRONG"
    print(
        f"{mark} {row['claim']:38s} lecture {row['lecture']:>7}   computed {row['computed']:9.2f}"
    )
assert lora_reduction(12288, 12288, 4) == 1536
assert abs(float(multitask_reduction(3, 512, 512, 8)) - 2.743) < 1e-3

# %% [markdown]
# And on a real architecture: LoRA r = 8 on GPT-2 small's `c_attn` (768 → 2304) in all 12
# layers. GPT-2 small has 124,439,808 parameters (HF `GPT2LMHeadModel`, tied embeddings);
# HF PEFT's `print_trainable_parameters` counts the adapters in "all params" too.
# (`tests/test_lora_inject.py` checks minipeft's line against HF PEFT's on the same model.)

# %%
from minipeft.peft.counts import lora_params

gpt2_small_params = 124_439_808
trainable = 12 * lora_params(2304, 768, 8)  # r·(d + k) per layer
total = gpt2_small_params + trainable
print(
    f"trainable params: {trainable:,d} || all params: {total:,d} || "
    f"trainable%: {100 * trainable / total:.4f}"
)
assert trainable == 294_912

# %% [markdown]
# ## 3. Forward and the fused backward (lecture §3.6; `derivations/lora.md`)
#
# `lora_linear` is one Function. Its backward is the closed form
# ∂L/∂B = s·Gᵀ·(X·Aᵀ), ∂L/∂A = s·(G·B)ᵀ·X, ∂L/∂X = G·W₀ + s·(G·B)·A, and it never forms
# ∂L/∂W₀ (W₀ is frozen). We compare with the formulas written out in NumPy here and with
# float64 central differences.

# %%
N, k, d, r, s = 6, 5, 4, 2, 0.75
X, W0, A, B = (rng.standard_normal(sh) for sh in [(N, k), (d, k), (r, k), (d, r)])
G = rng.standard_normal((N, d))
tX, tA, tB = (tensor(v, requires_grad=True) for v in (X, A, B))
tW0 = tensor(W0)  # frozen
H = lora_linear(tX, tW0, None, [(tA, tB, s)])
np.testing.assert_allclose(H.numpy(), X @ (W0 + s * B @ A).T, atol=1e-12)  # lora.forward
H.backward(G)
np.testing.assert_allclose(to_numpy(tB.grad), s * G.T @ (X @ A.T), atol=1e-12)  # lora.grad_B
np.testing.assert_allclose(to_numpy(tA.grad), s * (G @ B).T @ X, atol=1e-12)  # lora.grad_A
np.testing.assert_allclose(to_numpy(tX.grad), G @ W0 + s * (G @ B) @ A, atol=1e-12)  # grad_X
assert tW0.grad is None  # no ∂L/∂W₀ buffer
res = gradcheck(lambda x, a, b: lora_linear(x, Tensor(W0), None, [(a, b, s)]), [X, A, B])
print("max relative error vs float64 central differences:", f"{res.max_rel_error:.1e}")
assert res.max_rel_error < 1e-6

# %% [markdown]
# ## 4. Merge and unmerge
#
# x·(W₀ + s·B·A)ᵀ = x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ, so the adapter folds into W₀ for inference.
# In float64 the round trip W₀ → W₀ + ΔW → W₀ is exact to 1e-12; in float32 it drifts by
# about one rounding of the sum — measured here.

# %%
drift = {}
for dt in ("float64", "float32"):
    with backend.dtype_policy(dt):
        backend.seed(1)
        lay = LoraLayer(Linear(256, 256))
        lay.add_adapter("a", r=8, lora_alpha=16, init_lora_weights=False)
    w0 = lay.base_layer.weight.numpy().copy()  # a host copy: merge changes W₀ in place
    xin = tensor(rng.standard_normal((4, 256)).astype(dt))
    y = lay(xin).numpy()
    lay.merge()
    y_merged = lay(xin).numpy()
    lay.unmerge()
    drift[dt] = float(np.abs(lay.base_layer.weight.numpy() - w0).max())
    print(f"{dt}: max|W₀ after round trip − W₀| = {drift[dt]:.2e}   "
          f"max|y_merged − y| = {np.abs(y_merged - y).max():.2e}")  # fmt: skip
assert drift["float64"] <= 1e-12
assert drift["float32"] <= 2 * np.finfo(np.float32).eps * np.abs(w0).max() * 4

# %% [markdown]
# ## 5. Several tasks on one base (lecture §1.2)
#
# One frozen W₀, one (A, B) pair per task; switching task switches the pair, and
# disabling the adapters gives the base model back.

# %%
with backend.dtype_policy("float64"):
    backend.seed(2)
    multi = LoraLayer(Linear(8, 8))
    for t in ("summarize", "translate", "classify"):
        multi.add_adapter(t, r=2, lora_alpha=4, init_lora_weights=False)
xt = tensor(rng.standard_normal((3, 8)))
outs = {}
for t in ("summarize", "translate", "classify"):
    multi.set_adapter(t)
    a_, b_ = multi.lora_A[t].weight.numpy(), multi.lora_B[t].weight.numpy()
    outs[t] = multi(xt).numpy()
    base = multi.base_layer(xt).numpy()
    np.testing.assert_allclose(outs[t], base + 2.0 * xt.numpy() @ a_.T @ b_.T)
with multi.disable_adapters():
    np.testing.assert_array_equal(multi(xt).numpy(), multi.base_layer(xt).numpy())
assert np.abs(outs["summarize"] - outs["translate"]).max() > 1e-3

# %% [markdown]
# ## 6. Fine-tuning curves: LoRA vs full fine-tuning — adaptation and forgetting
#
# A small GPT-2 (character level, 2 layers, width 48) is pretrained briefly on one real
# corpus that ships with NumPy: the **docstrings of NumPy's public functions** (English
# prose with examples). It is then adapted to another real corpus: the **source code of
# a few pure-Python standard-library modules** (`textwrap`, `heapq`, `bisect`, …). We
# measure two held-out losses during adaptation: on the new corpus (adaptation) and on
# the old one (forgetting), for LoRA (r = 8 on `c_attn` and `c_fc`) and for full
# fine-tuning, with the same optimizer (AdamW), steps and batches.

# %%
from minipeft.data import CHAR_VOCAB, char_corpora
from minipeft.optim import AdamW

VOCAB = CHAR_VOCAB  # printable ASCII 32..126 → 1..95, newline → 0; anything else → "?"
corpus_a, corpus_b = char_corpora()  # NumPy's docstrings; standard-library source
print(f"corpus A (NumPy docstrings): {corpus_a.size:,} chars; "
      f"corpus B (stdlib source): {corpus_b.size:,} chars")  # fmt: skip


def split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cut = int(0.9 * ids.size)
    return ids[:cut], ids[cut:]


(train_a, held_a), (train_b, held_b) = split(corpus_a), split(corpus_b)
T, BATCH = 32, 8


def batch(ids: np.ndarray, gen: np.random.Generator) -> np.ndarray:
    starts = gen.integers(0, ids.size - T, BATCH)
    return np.stack([ids[i : i + T] for i in starts])  # (BATCH, T)


def held_out_loss(model, ids: np.ndarray) -> float:
    rows = np.stack([ids[i : i + T] for i in range(0, 16 * T * 4, T * 4)])  # 16 fixed windows
    model.eval()
    with no_grad():
        value = float(model.loss(rows).data)
    model.train()
    return value


def train(model, params, ids, steps, lr, seed, log=None):
    opt = AdamW(params, lr=lr, weight_decay=0.0)
    gen = np.random.default_rng(seed)
    for step in range(steps):
        loss = model.loss(batch(ids, gen))
        model.zero_grad()
        loss.backward()
        opt.step()
        if log is not None and (step + 1) % 10 == 0:
            log.append((step + 1, held_out_loss(model, held_b), held_out_loss(model, held_a)))


cfg = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=48, n_layer=2, n_head=4,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
t0 = time.perf_counter()
backend.seed(3)
pre = GPT2(cfg)
loss_a_init = held_out_loss(pre, held_a)
train(pre, list(pre.parameters()), train_a, steps=100, lr=3e-3, seed=0)
loss_a_pre, loss_b_pre = held_out_loss(pre, held_a), held_out_loss(pre, held_b)
print(f"pretraining on A: held-out loss on A {loss_a_init:.2f} → {loss_a_pre:.2f} "
      f"({time.perf_counter() - t0:.1f} s); on B {loss_b_pre:.2f}")  # fmt: skip
assert loss_a_pre < loss_a_init - 1.0
state = {k: v.copy() for k, v in pre.state_dict().items()}


# %%
def fresh() -> GPT2:
    model = GPT2(cfg)
    model.load_state_dict(state)
    return model


curves = {}
t0 = time.perf_counter()
full = fresh()
curves["full fine-tuning"] = [(0, loss_b_pre, loss_a_pre)]
train(full, list(full.parameters()), train_b, steps=40, lr=1e-3, seed=1,
      log=curves["full fine-tuning"])  # fmt: skip
lora = get_peft_model(fresh(), LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                          fan_in_fan_out=True))  # fmt: skip
n_lora, n_all = lora.get_nb_trainable_parameters()
curves["LoRA r=8"] = [(0, loss_b_pre, loss_a_pre)]
train(lora.get_base_model(), [p for p in lora.parameters() if p.requires_grad], train_b,
      steps=40, lr=1e-2, seed=1, log=curves["LoRA r=8"])  # fmt: skip
print(f"adaptation ({time.perf_counter() - t0:.1f} s): LoRA trains {n_lora:,} of {n_all:,} "
      f"parameters ({100 * n_lora / n_all:.1f}%)")  # fmt: skip
for name, c in curves.items():
    print(f"{name:17s} held-out B {c[0][1]:.3f} → {c[-1][1]:.3f}   "
          f"held-out A {c[0][2]:.3f} → {c[-1][2]:.3f}")  # fmt: skip

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for name, c in curves.items():
    steps_, lb, la = zip(*c)
    axes[0].plot(steps_, lb, marker="o", label=name)
    axes[1].plot(steps_, la, marker="o", label=name)
axes[0].set(title="adaptation: held-out loss on B (stdlib source)", xlabel="step", ylabel="loss")
axes[1].set(title="forgetting: held-out loss on A (NumPy docs)", xlabel="step")
axes[0].legend()
plt.tight_layout()
plt.show()
for c in curves.values():
    assert c[-1][1] < c[0][1]  # both adapt to the new corpus

# %% [markdown]
# What to read in the curves: both methods lower the loss on the new corpus; the
# forgetting of the old corpus is measured, not assumed — LoRA changes W₀ only by a
# rank-8 ΔW in two matrices per block and leaves the embeddings and LayerNorms frozen,
# full fine-tuning moves everything. (With this tiny model and a few dozen steps the
# numbers are indicative only; the printed values are what this run measured.)
