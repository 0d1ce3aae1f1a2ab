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
# # 03 · The LoRA family: rsLoRA, LoRA+, PiSSA, DoRA, VeRA, IA3, BitFit, composition
#
# Follows **lecture 23, §3.8 (LoRA+), §3.9 (VeRA), §3.10 (other variants)**, plus DoRA,
# rsLoRA, PiSSA/OLoRA, IA3 and BitFit, which the lecture lacks (`ERRATA.md` items 7, 10,
# 11, 14). Derivations: `derivations/lora_family.md` (and `lora.md` for rsLoRA/PiSSA);
# checks: `python -m minipeft verify dora`, `… vera`, `… ia3`.
#
# The experiments use one small, fully known task so they run in seconds: a frozen
# W₀ (64×64) and a target W₀ + ΔW* with ΔW* of rank 4; an adapter is trained with AdamW
# on the mean squared error of H = adapter(X) against X·(W₀ + ΔW*)ᵀ.
#
# It runs on the NumPy backend by default; `MINIPEFT_BACKEND=cupy` trains the adapters on a
# GPU. The task (W₀, ΔW*, X) is built on the host, moved in explicitly (`to_device`), and the
# results come back explicitly (`.numpy()`, `to_numpy`) to be checked, printed and plotted.

# %%
import matplotlib.pyplot as plt
import numpy as np

import minipeft
from minipeft import backend, tensor
from minipeft.autograd.gradcheck import gradcheck
from minipeft.autograd.tensor import Tensor
from minipeft.backend import to_device, to_numpy
from minipeft.nn import Linear
from minipeft.optim import AdamW
from minipeft.peft import LoraLayer, dora_delta, loraplus_param_groups, vera_linear

print("backend:", minipeft.get_backend())
rng = np.random.default_rng(0)
D, N = 64, 128
X = rng.standard_normal((N, D))
with backend.dtype_policy("float64"):
    backend.seed(0)
    W0 = Linear(D, D, bias=False).weight.numpy()  # the frozen weight, kept on the host
dW_true = rng.standard_normal((D, 4)) @ rng.standard_normal((4, D)) / 8  # rank 4
Y = X @ (W0 + dW_true).T


def make_layer(r: int, **kw) -> LoraLayer:
    with backend.dtype_policy("float64"):
        backend.seed(1)
        base = Linear(D, D, bias=False)
        base.weight.data[...] = to_device(W0)
        layer = LoraLayer(base)
        layer.add_adapter("a", r=r, **kw)
    return layer


def fit(layer: LoraLayer, groups, steps: int = 100) -> list[float]:
    opt = AdamW(groups, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = ((layer(tensor(X)) - tensor(Y)) ** 2).mean()
        layer.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# %% [markdown]
# ## 1. rsLoRA: α/r vs α/√r across ranks (ERRATA 7)
#
# With s = α/r the update s·B·A shrinks as r grows (B and A move by roughly fixed amounts
# per Adam step, and B·A sums r such terms), so a larger rank buys little; Kalajdzievski
# (2023) proves s = α/√r keeps the update's scale independent of r ("rank-stabilized").
# We measure ‖ΔW‖ after 10 steps and the loss after 100, for r = 4, 16, 64 (α = 8).

# %%
results = {}
for rs in (False, True):
    for r in (4, 16, 64):
        layer = make_layer(r, lora_alpha=8, use_rslora=rs)
        p = [layer.lora_A["a"].weight, layer.lora_B["a"].weight]
        early = fit(layer, [{"params": p, "lr": 2e-3}], steps=10)
        norm10 = float(np.linalg.norm(to_numpy(layer.delta_weight("a"))))
        late = fit(layer, [{"params": p, "lr": 2e-3}], steps=90)
        results[(rs, r)] = (norm10, early + late)
        name = "α/√r" if rs else "α/r "
        print(f"{name} r={r:3d}: s = {layer.scaling['a']:.3f}   ‖ΔW‖ after 10 steps = "
              f"{norm10:.3f}   loss after 100 = {late[-1]:.4f}")  # fmt: skip

fig, ax = plt.subplots(figsize=(6, 3.5))
for (rs, r), (_, curve) in results.items():
    ax.semilogy(curve, ls="-" if rs else "--", label=f"{'α/√r' if rs else 'α/r'}, r={r}")
ax.set(xlabel="AdamW step", ylabel="MSE", title="rsLoRA keeps larger ranks useful")
ax.legend(fontsize=7)
plt.show()
# α/r: ‖ΔW‖ falls as r grows; α/√r: it does not, and the larger ranks then learn faster.
assert results[(False, 64)][0] < results[(False, 4)][0]
assert results[(True, 64)][0] > 0.5 * results[(True, 4)][0]
assert results[(True, 64)][1][-1] < results[(False, 64)][1][-1]

# %% [markdown]
# ## 2. LoRA+: B gets the larger learning rate (ERRATA 10)
#
# Hayou et al. (2024): η_B = λ·η_A with λ ≈ 16 (HF PEFT scales the rate of `lora_B`); the
# lecture has it backwards. `loraplus_param_groups` makes the two AdamW groups.

# %%
curves = {}
for ratio in (1, 16):
    layer = make_layer(8, lora_alpha=8)
    groups = loraplus_param_groups(layer, lr=2e-3, loraplus_lr_ratio=ratio)
    curves[ratio] = fit(layer, groups)
fig, ax = plt.subplots(figsize=(6, 3.5))
for ratio, c in curves.items():
    ax.semilogy(c, label=f"η_B = {ratio}·η_A" + (" (LoRA)" if ratio == 1 else " (LoRA+)"))
ax.set(xlabel="AdamW step", ylabel="MSE", title="LoRA vs LoRA+ (r = 8)")
ax.legend()
plt.show()
print({k: round(v[-1], 5) for k, v in curves.items()})
assert curves[16][-1] < curves[1][-1]

# %% [markdown]
# ## 3. PiSSA and OLoRA: move the principal part into the adapter
#
# W₀ = U·S·Vᵀ; PiSSA puts U_r·S_r·V_rᵀ into s·B·A and keeps the rest in W₀', so
# W₀' + s·B·A = W₀ at initialization (the model is unchanged) — `derivations/lora.md`.

# %%
shares = {}
for init in ("pissa", "olora"):
    layer = make_layer(4, lora_alpha=8, init_lora_weights=init)
    a, b = layer.lora_A["a"].weight.numpy(), layer.lora_B["a"].weight.numpy()
    w_res = layer.base_layer.weight.numpy()
    np.testing.assert_allclose(w_res + layer.scaling["a"] * b @ a, W0, atol=1e-12)
    shares[init] = np.linalg.norm(layer.scaling["a"] * b @ a) ** 2 / np.linalg.norm(W0) ** 2
    print(f"{init}: W₀' + s·B·A = W₀ ✓; s·B·A holds {100 * shares[init]:.1f}% of ‖W₀‖²_F")
sv = np.linalg.svd(W0, compute_uv=False)
# PiSSA's adapter is the best rank-4 approximation: its share is Σ_{i≤4} σᵢ² / Σ σᵢ².
# (OLoRA's Q_r·R_r is not an approximation of W₀ in that sense; its share is just reported.)
np.testing.assert_allclose(shares["pissa"], (sv[:4] ** 2).sum() / (sv**2).sum(), rtol=1e-10)

# %% [markdown]
# ## 4. DoRA: magnitude and direction
#
# W' = m ⊙ (W₀ + s·B·A)/‖W₀ + s·B·A‖_row, m initialized to ‖W₀‖_row. The norm is detached
# in backward (paper §4.3, HF PEFT). We check ∂L/∂m exactly and show how far the detached
# ∂L/∂A, ∂L/∂B are from the gradients of the full function (finite differences).

# %%
x_, w0_ = rng.standard_normal((5, 6)), rng.standard_normal((4, 6))
a_, b_, m_ = rng.standard_normal((2, 6)), rng.standard_normal((4, 2)), rng.random(4) + 1


def f(x, m, a, b):
    return dora_delta(x, Tensor(w0_), m, a, b, 0.5)


res = gradcheck(f, [x_, m_, a_, b_])
print("relative error vs finite differences of the full (non-detached) function:")
for name, e in zip(("x", "m", "A", "B"), res.per_input):
    print(f"  ∂L/∂{name}: {e:.1e}")
assert res.per_input[1] < 1e-6  # ∂L/∂m is exact (n does not depend on m)
assert res.per_input[2] > 1e-3  # ∂L/∂A drops the norm's term, by design

layer = make_layer(4, lora_alpha=8, use_dora=True)
np.testing.assert_allclose(
    layer.lora_magnitude_vector["a"].weight.numpy(), np.linalg.norm(W0, axis=1), atol=1e-12
)
dora_curve = fit(layer, [{"params": [p for p in layer.parameters() if p.requires_grad],
                          "lr": 2e-3}])  # fmt: skip
print(f"DoRA r=4 loss after 100 steps: {dora_curve[-1]:.4f} "
      f"(LoRA r=4 α/r: {results[(False, 4)][1][-1]:.4f})")  # fmt: skip
y = layer(tensor(X)).numpy()
layer.merge()
np.testing.assert_allclose(layer(tensor(X)).numpy(), y, atol=1e-10)
layer.unmerge()

# %% [markdown]
# ## 5. VeRA (ERRATA 11)
#
# Frozen shared random A, B; trainable λ_b ∈ ℝ^d (init 0) and λ_d ∈ ℝ^r (init 0.1); no
# α/r. The lecture initializes both vectors to ones and multiplies by α/r: then ΔW ≠ 0
# at start — the model is changed before any training.

# %%
r = 16
pa = np.random.default_rng(5).uniform(-1, 1, (r, D)) * np.sqrt(6 / D)
pb = np.random.default_rng(6).uniform(-1, 1, (D, r)) * np.sqrt(6 / r)
xv = tensor(X[:4])
base_out = X[:4] @ W0.T
vera_out = vera_linear(xv, tensor(W0), None, tensor(np.zeros(D)), tensor(np.full(r, 0.1)),
                       to_device(pa), to_device(pb)).numpy()  # fmt: skip
lecture_dw = (8 / r) * np.diag(np.ones(D)) @ pb @ np.diag(np.ones(r)) @ pa  # ones, α/r
print(f"VeRA init:    max|ΔH| = {np.abs(vera_out - base_out).max():.1e}")
print(f"lecture init: ‖ΔW‖_F = {np.linalg.norm(lecture_dw):.2f}  (vs ‖W₀‖_F = "
      f"{np.linalg.norm(W0):.2f})")  # fmt: skip
print(f"trainable per layer: VeRA d + r = {D + r}; the lecture's d + k = {D + D}; "
      f"LoRA r·(d + k) = {r * 2 * D}")  # fmt: skip
np.testing.assert_array_equal(vera_out, base_out)
assert np.linalg.norm(lecture_dw) > 1

# %% [markdown]
# ## 6. IA3 and BitFit on GPT-2: how few parameters
#
# IA3 scales the outputs of `c_attn` and the input of the feed-forward `c_proj`
# (HF PEFT's convention); BitFit trains the biases only. Counts on a small GPT-2, in HF
# PEFT's format.

# %%
from minipeft.models.gpt2 import GPT2, GPT2Config
from minipeft.peft import IA3Config, LoraConfig, VeraConfig, apply_bitfit, get_peft_model

cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4)
lines = {}
for name, conf in {
    "LoRA r=8 (c_attn)": LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True),
    "VeRA r=8 (c_attn, c_fc)": VeraConfig(r=8, target_modules=["c_attn", "c_fc"],
                                          fan_in_fan_out=True),
    "IA3": IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                     fan_in_fan_out=True),
}.items():  # fmt: skip
    print(f"{name:25s}", end=" ")
    lines[name] = get_peft_model(GPT2(cfg), conf).get_nb_trainable_parameters()
    get_peft_model(GPT2(cfg), conf).print_trainable_parameters()
bitfit_model = GPT2(cfg)
n_bias, n_total = apply_bitfit(bitfit_model)
print(f"{'BitFit':25s} trainable params: {n_bias:,d} || all params: {n_total:,d}")
assert lines["IA3"][0] == 2 * (3 * 48 + 4 * 48)  # c_attn out = 3·48, mlp.c_proj in = 4·48
assert lines["VeRA r=8 (c_attn, c_fc)"][0] == 2 * ((3 * 48 + 8) + (4 * 48 + 8))

# %% [markdown]
# ## 7. Composition and subspace similarity (see `derivations/lora_compose.md`)
#
# Two adapters trained on the same task from different random A's: how much of their
# subspaces do they share? φ(A₁, A₂, i, j) = ‖V₁ⁱᵀV₂ʲ‖²_F / min(i, j) (LoRA paper §7).
# Concatenation composes them exactly.

# %%
from minipeft.peft.compose import combine_cat, combined_delta
from minipeft.peft.similarity import subspace_similarity_grid

trained = []
for seed in (11, 12):
    with backend.dtype_policy("float64"):
        backend.seed(seed)
        base = Linear(D, D, bias=False)
        base.weight.data[...] = to_device(W0)
        lay = LoraLayer(base)
        lay.add_adapter("a", r=8, lora_alpha=8)
    fit(lay, loraplus_param_groups(lay, lr=2e-3), steps=60)
    trained.append((lay.lora_A["a"].weight.data.copy(), lay.lora_B["a"].weight.data.copy(),
                    lay.scaling["a"]))  # fmt: skip
phi = subspace_similarity_grid(trained[0][0], trained[1][0])
plt.figure(figsize=(3.5, 3))
plt.imshow(phi, vmin=0, vmax=1, origin="lower", extent=(0.5, 8.5, 0.5, 8.5))
plt.colorbar(label="φ(A₁, A₂, i, j)")
plt.xlabel("j")
plt.ylabel("i")
plt.title("subspace similarity")
plt.show()
a_cat, b_cat, s_cat = combine_cat(trained, [0.5, 0.5])
np.testing.assert_allclose(to_numpy(s_cat * b_cat @ a_cat),
                           to_numpy(combined_delta(trained, [0.5, 0.5])), atol=1e-12)  # fmt: skip
assert 0.0 <= phi.min() and phi.max() <= 1.0 + 1e-12
