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
# # 00 · Reverse-mode autograd from scratch, the engine, and gradcheck
#
# Follows **lecture 23, §3.6 "Boss Battle", Steps 4–5**: the lecture computes ∂L/∂B_q and
# ∂L/∂A_q by the chain rule and then updates them, and sums over the batch by hand. This
# notebook builds the general machinery those steps rely on — reverse-mode
# backpropagation — and the tool that checks every gradient in minipeft: central finite
# differences in float64. The derivation is `derivations/autograd.md`; the code is
# `minipeft/autograd/`; the registered checks are `python -m minipeft verify ops` and
# `python -m minipeft verify autograd`. Each equation cell ends with an assertion.
#
# It runs on the NumPy backend by default; `MINIPEFT_BACKEND=cupy` runs the engine on a GPU
# (CuPy arrays). Values leave the engine explicitly, through `to_numpy`, where they are
# compared with NumPy references, printed or plotted.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np

import minipeft
from minipeft import tensor
from minipeft.autograd import Function, gradcheck, no_grad, ops
from minipeft.autograd.gradcheck import numerical_grad
from minipeft.backend import to_numpy
from minipeft.verify import run, select

print("backend:", minipeft.get_backend())
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Reverse mode on a tiny example, by hand
#
# L(a, b) = (a·b + tanh a)·b. The forward is a graph of four primitive operations:
#
#     u = a·b,   v = tanh a,   w = u + v,   L = w·b.
#
# Reverse mode starts from L̄ = 1 and visits the nodes outputs-first, each time multiplying
# the adjoint by the local derivative (a vector-Jacobian product) and **adding** it to the
# adjoint of every input: b is used twice (in u and in L) and a twice (in u and in v).

# %%
a, b = 0.7, -1.3
u = a * b
v = math.tanh(a)
w = u + v
L = w * b

L_bar = 1.0
w_bar = L_bar * b  # L = w·b
b_bar = L_bar * w  # first use of b
u_bar = w_bar  # w = u + v
v_bar = w_bar
a_bar = v_bar * (1 - v**2)  # v = tanh a: first use of a
a_bar += u_bar * b  # u = a·b: second use of a — accumulate
b_bar += u_bar * a  # second use of b — accumulate

# closed form: ∂L/∂a = (b + 1 − tanh²a)·b,  ∂L/∂b = 2ab + tanh a
np.testing.assert_allclose(a_bar, (b + 1 - math.tanh(a) ** 2) * b, rtol=1e-15)
np.testing.assert_allclose(b_bar, 2 * a * b + math.tanh(a), rtol=1e-15)
print(f"L = {L:.6f}, dL/da = {a_bar:.6f}, dL/db = {b_bar:.6f}")

# %% [markdown]
# ## 2. The same thing as a 25-line engine
#
# Record each operation's inputs and its local derivatives; sort the graph topologically;
# walk it backwards accumulating with `+=`. This is the whole idea of
# `minipeft/autograd/tensor.py` (which works on arrays, and whose ops return VJPs instead
# of scalar derivatives).


# %%
class Value:
    def __init__(self, data, parents=(), local_grads=()):
        self.data, self.grad = data, 0.0
        self.parents, self.local_grads = parents, local_grads

    def __add__(self, other):
        return Value(self.data + other.data, (self, other), (1.0, 1.0))

    def __mul__(self, other):
        return Value(self.data * other.data, (self, other), (other.data, self.data))

    def tanh(self):
        t = math.tanh(self.data)
        return Value(t, (self,), (1 - t * t,))

    def backward(self):
        order, seen = [], set()

        def visit(node):  # post-order DFS: inputs before the nodes that use them
            if id(node) not in seen:
                seen.add(id(node))
                for p in node.parents:
                    visit(p)
                order.append(node)

        visit(self)
        self.grad = 1.0
        for node in reversed(order):  # outputs first
            for p, local in zip(node.parents, node.local_grads):
                p.grad += local * node.grad  # chain rule, accumulated over uses


A, B = Value(a), Value(b)
out = (A * B + A.tanh()) * B
out.backward()
np.testing.assert_allclose([A.grad, B.grad], [a_bar, b_bar], rtol=1e-15)

# %% [markdown]
# ## 3. minipeft's engine: arrays, VJPs, frozen inputs
#
# The same L with minipeft Tensors, then a LoRA-shaped layer
# h = tanh(x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ) with the pretrained W₀ frozen. Only A and B require a
# gradient; the engine tells the matmul with W₀ that W₀ needs none, and W₀ never gets a
# `.grad` (nor is its gradient product computed: `tests/test_engine.py` counts the matmuls).

# %%
ta, tb = tensor(np.array(a), requires_grad=True), tensor(np.array(b), requires_grad=True)
((ta * tb + ops.tanh(ta)) * tb).backward()
np.testing.assert_allclose([to_numpy(ta.grad), to_numpy(tb.grad)], [a_bar, b_bar], rtol=1e-15)

x = rng.standard_normal((6, 5))  # (tokens, in)
W0 = rng.standard_normal((4, 5))  # (out, in), frozen
A_ = rng.standard_normal((2, 5)) * 0.5  # (r, in)
B_ = rng.standard_normal((4, 2)) * 0.5  # (out, r)
s = 0.5


def lora_loss(x, W0, A, B):
    return ops.tanh(ops.matmul(x, W0.T) + s * ops.matmul(ops.matmul(x, A.T), B.T)).sum()


tW0, tA, tB = tensor(W0), tensor(A_, requires_grad=True), tensor(B_, requires_grad=True)
lora_loss(tensor(x), tW0, tA, tB).backward()
assert tW0.grad is None

# the lecture's §3.6 Step 4, with Ḡ = ∂L/∂H = 1 − tanh²(H) and the batch sum written out:
H = x @ W0.T + s * (x @ A_.T) @ B_.T
G = 1 - np.tanh(H) ** 2  # (tokens, out)
grad_B = s * G.T @ (x @ A_.T)  # ∂L/∂B = s·Σᵢ ḡᵢ (A xᵢ)ᵀ
grad_A = s * (G @ B_).T @ x  # ∂L/∂A = s·Σᵢ (Bᵀ ḡᵢ) xᵢᵀ
np.testing.assert_allclose(to_numpy(tB.grad), grad_B, rtol=1e-12)
np.testing.assert_allclose(to_numpy(tA.grad), grad_A, rtol=1e-12)

with no_grad():  # inference: nothing is recorded
    y = lora_loss(tensor(x), tW0, tA, tB)
assert y._ctx is None and not y.requires_grad

# %% [markdown]
# ## 4. gradcheck: central differences in float64
#
# ∂L/∂x_k ≈ (L(x + εe_k) − L(x − εe_k)) / 2ε, with ε = 10⁻⁶ in float64. `gradcheck`
# compares this with `backward` for every entry (or along random directions for large
# inputs) and returns the largest relative error. It must be able to fail: a Function
# whose VJP is off by one part in 10⁵ is caught.

# %%
res = gradcheck(lora_loss, [x, W0, A_, B_], wrt=[2, 3])
print("LoRA layer, A and B:", res)
assert res.max_rel_error < 1e-7

xl, gamma, beta = (
    rng.standard_normal((3, 6)),
    1 + 0.2 * rng.standard_normal(6),
    rng.standard_normal(6),
)
res_ln = gradcheck(lambda x, g, b: ops.layer_norm(x, g, b), [xl, gamma, beta])
print("layer_norm:", res_ln)
assert res_ln.max_rel_error < 1e-6


class Square(Function):
    """y = x² with a VJP that is wrong by a factor (1 + bug)."""

    bug = 0.0

    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, g):
        return g * 2 * self.x * (1 + self.bug)


x0 = rng.uniform(0.5, 1.5, 8)
errors = {}
for bug in (0.0, 1e-5, 1e-3, -0.5):
    Square.bug = bug
    errors[bug] = gradcheck(Square.apply, [x0]).max_rel_error
print({f"bug={k:g}": f"{v:.1e}" for k, v in errors.items()})
assert errors[0.0] < 1e-8 and errors[1e-5] > 5e-6 and errors[-0.5] > 0.3

# %% [markdown]
# ## 5. Why float64: the error of a central difference against ε
#
# For a smooth f the central difference has a truncation error ≈ ε²|f'''|/6 and a rounding
# error ≈ u|f|/ε (u = unit roundoff: 1.1·10⁻¹⁶ in float64, 6.0·10⁻⁸ in float32). The sum is
# smallest near ε* = (3u|f|/|f'''|)^{1/3}, with error ≈ ½(3u)^{2/3}: about 2·10⁻¹¹ in
# float64 but 2·10⁻⁵ in float32 — too coarse to tell a right VJP from one that is off by
# 10⁻⁵. Below: f(x) = x³/3 + e^{x/2} at x = 0.8, whose derivative f'(x) = x² + ½e^{x/2} is
# known exactly.

# %%
x_star = 0.8
exact = x_star**2 + 0.5 * math.exp(x_star / 2)
f3 = 2 + math.exp(x_star / 2) / 8  # f'''(x)
f0 = x_star**3 / 3 + math.exp(x_star / 2)
epsilons = np.logspace(-12, -0.5, 60)


def fd_error(dtype, eps):
    xx, ee = dtype(x_star), dtype(eps)
    up = (xx + ee) ** 3 / dtype(3) + np.exp((xx + ee) / dtype(2))
    down = (xx - ee) ** 3 / dtype(3) + np.exp((xx - ee) / dtype(2))
    return abs(float((up - down) / (2 * ee)) - exact) / exact  # as gradcheck divides


err64 = np.array([fd_error(np.float64, e) for e in epsilons])
err32 = np.array([fd_error(np.float32, e) for e in epsilons])
model = {
    name: (epsilons**2 * f3 / 6 + u * f0 / epsilons) / exact
    for name, u in (("float64", 2.0**-53), ("float32", 2.0**-24))
}

fig, ax = plt.subplots(figsize=(6.5, 4))
ax.loglog(epsilons, np.maximum(err64, 1e-17), "o", ms=3, label="float64 measured")
ax.loglog(epsilons, np.maximum(err32, 1e-17), "s", ms=3, label="float32 measured")
ax.loglog(epsilons, model["float64"], "-", lw=1, label="ε²|f'''|/6 + u|f|/ε, float64")
ax.loglog(epsilons, model["float32"], "--", lw=1, label="same model, float32")
ax.axvline(1e-6, color="grey", lw=0.5)
ax.set_xlabel("ε")
ax.set_ylabel("relative error of f'(x)")
ax.set_ylim(1e-14, 10)
ax.legend(fontsize=8)
ax.set_title("central difference: truncation vs rounding")
plt.show()

best64, best32 = err64.min(), err32.min()
eps64, eps32 = epsilons[err64.argmin()], epsilons[err32.argmin()]
print(
    f"float64: best {best64:.1e} at ε = {eps64:.0e};  at ε = 1e-6: {fd_error(np.float64, 1e-6):.1e}"
)
print(
    f"float32: best {best32:.1e} at ε = {eps32:.0e};  at ε = 1e-6: {fd_error(np.float32, 1e-6):.1e}"
)
assert best64 < 1e-9 and best32 > 1e-7  # four orders of magnitude apart, or more
assert 1e-7 < eps64 < 1e-3 and 1e-4 < eps32 < 1e-1  # ε* ~ u^{1/3}: 7e-6 and 6e-3
assert fd_error(np.float64, 1e-6) < 1e-9 and fd_error(np.float32, 1e-6) > 1e-3

# %% [markdown]
# minipeft's own estimator (`numerical_grad`) on the same f, as a vector of terms: the
# differences are taken term by term and then summed, so the rounding error is that of one
# term, not of the sum.

# %%
xs = rng.uniform(-1.5, 1.5, 10)
fd = numerical_grad(lambda t: (t * t * t) * (1 / 3) + (t * 0.5).exp(), [xs], 0, weights=np.ones(10))
np.testing.assert_allclose(fd, xs**2 + 0.5 * np.exp(xs / 2), rtol=1e-9)

# %% [markdown]
# ## 6. Every op's VJP, checked
#
# One registered check per primitive op (`ops.add` … `ops.dropout`): the forward against a
# NumPy/SciPy reference and the VJP against float64 central differences, on small
# fixed-seed inputs. The error shown is the larger of the two.

# %%
results = run(select("ops") + select("autograd"))
for r in results:
    print(f"{r.equation.id:20s} {r.error:9.2e}  {'PASS' if r.passed else 'FAIL'}")
assert all(r.passed for r in results) and len(results) >= 30
