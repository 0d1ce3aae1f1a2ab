"""Registered checks for GPT-2 (derivations/gpt2.md): Conv1D's VJP, the tied output
matrix's two gradients, and the shifted next-token loss.

References: float64 central differences and an explicit Python loop — never a second
run of the code under test. Errors are relative to the largest entry of the reference.
"""

from __future__ import annotations

import numpy as np

from ... import backend
from ...autograd.tensor import Tensor
from ...models.gpt2 import GPT2, GPT2Config
from ...nn.conv1d import Conv1DFunction, conv1d
from .. import Outcome, equation

EPS = 1e-6  # central-difference step (float64)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def _tiny_gpt2(seed: int) -> GPT2:
    """A float64 GPT-2 (1 layer, C = 8, 2 heads, V = 11) with every parameter random."""
    backend.seed(seed)
    cfg = GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    with backend.dtype_policy("float64"):
        model = GPT2(cfg)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        base = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0
        p.data[...] = base + 0.3 * rng.standard_normal(p.shape)
    return model.eval()


@equation(
    "gpt2.conv1d_vjp",
    what="Y = X·W + b (W (in, out)): X̄ = Ḡ·Wᵀ, W̄ = Xᵀ·Ḡ, b̄ = Σₙ Ḡₙ",
    derivation="gpt2.md",
    implements=Conv1DFunction,
    tol=1e-7,
)
def _check_conv1d() -> Outcome:
    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    g = rng.standard_normal((2, 3, 5))  # L = ⟨G, Y⟩
    tx, tw, tb = (Tensor(a, requires_grad=True) for a in (x, w, b))
    y = conv1d(tx, tw, tb)
    y.backward(g)
    err = _rel(y.data, np.einsum("bti,io->bto", x, w) + b)

    def loss(xx: np.ndarray, ww: np.ndarray, bb: np.ndarray) -> float:
        return float(np.sum(g * (np.einsum("bti,io->bto", xx, ww) + bb)))

    args = [x, w, b]
    for i, t in enumerate((tx, tw, tb)):
        fd = np.zeros_like(args[i])
        for idx in np.ndindex(*args[i].shape):
            up = [a.copy() for a in args]
            dn = [a.copy() for a in args]
            up[i][idx] += EPS
            dn[i][idx] -= EPS
            fd[idx] = (loss(*up) - loss(*dn)) / (2 * EPS)
        err = max(err, _rel(t.grad, fd))
    return Outcome(
        error=err,
        arrays={"x": x, "weight": w, "bias": b, "y": y.data, "grad_y": g,
                "grad_x": tx.grad, "grad_weight": tw.grad, "grad_bias": tb.grad},
    )  # fmt: skip


@equation(
    "gpt2.tied_grad",
    what="tied E: Ē = Z̄ᵀ·Ĥ + scatter_add(ids, H̄⁰) (both paths reach wte)",
    derivation="gpt2.md",
    implements=GPT2.forward,
    tol=1e-7,
)
def _check_tied_grad() -> Outcome:
    model = _tiny_gpt2(3)
    ids = np.array([[1, 4, 4, 9, 1, 2]])  # repeated tokens: rows of Ē get several terms
    wte = model.transformer.wte.weight
    model.loss(ids).backward()
    grad = wte.grad.copy()
    rng = np.random.default_rng(4)
    err = 0.0
    orig = wte.data.copy()
    for _ in range(3):
        u = rng.standard_normal(wte.shape)
        wte.data[...] = orig + EPS * u
        up = model.loss(ids).item()
        wte.data[...] = orig - EPS * u
        dn = model.loss(ids).item()
        wte.data[...] = orig
        fd = (up - dn) / (2 * EPS)  # ⟨Ē, U⟩ by central differences
        err = max(err, abs(float(np.sum(grad * u)) - fd) / max(abs(fd), 1e-12))
    return Outcome(error=err, arrays={"ids": ids, "wte": orig, "grad_wte": grad})


@equation(
    "gpt2.lm_loss",
    what="L = mean over t ≤ T−2, y[t+1] ≠ −100 of logsumexp(Z_t) − Z_t[y_{t+1}]",
    derivation="gpt2.md",
    implements=GPT2.loss,
    tol=1e-12,
)
def _check_lm_loss() -> Outcome:
    model = _tiny_gpt2(5)
    ids = np.array([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])
    labels = ids.copy()
    labels[0, 3] = -100  # a masked position inside the sequence
    labels[1, :2] = -100  # a two-token "prompt" that must not count
    loss = model.loss(ids, labels).item()
    z = model(ids).data  # (B, T, V) logits: the input of the equation
    terms = []
    for b in range(z.shape[0]):
        for t in range(z.shape[1] - 1):
            target = labels[b, t + 1]
            if target == -100:
                continue
            row = z[b, t]
            m = row.max()
            terms.append(m + np.log(np.sum(np.exp(row - m))) - row[target])
    want = sum(terms) / len(terms)
    return Outcome(
        error=abs(loss - want) / abs(want),
        arrays={"ids": ids, "labels": labels, "logits": z, "loss": np.array(loss)},
    )
