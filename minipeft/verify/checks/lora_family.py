"""Checks for derivations/lora_family.md: DoRA, VeRA, IA3.

DoRA's gradients are checked against float64 central differences of a NumPy reference in
which the row norm is held constant (the paper's §4.3 detach); its forward and merge
against the paper's formula written here in NumPy. VeRA and IA3 gradients against central
differences of the layer's own output; their forwards against NumPy formulas.
"""

from __future__ import annotations

import numpy as np

from ...autograd.gradcheck import gradcheck, numerical_grad, rel_error
from ...autograd.tensor import Tensor
from ...peft.dora import dora_delta, dora_merged_weight, dora_weight_norm
from ...peft.ia3 import ia3_linear
from ...peft.vera import vera_linear
from ..registry import Outcome, equation

S = 0.75


def _dora_case() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(10)
    return {
        "x": rng.standard_normal((3, 5)),
        "w0": rng.standard_normal((4, 5)),
        "m": rng.random(4) + 0.5,
        "A": rng.standard_normal((2, 5)),
        "B": rng.standard_normal((4, 2)),
        "mask": (rng.random((3, 5)) > 0.3) / 0.7,  # a dropout multiplier M/(1−p)
        "G": rng.standard_normal((3, 4)),
    }


def _dora_grad(index: int, name: str) -> Outcome:
    c = _dora_case()
    n = np.linalg.norm(c["w0"] + S * c["B"] @ c["A"], axis=1)  # detached norm, a constant

    def ref_loss(x, m, a, b):  # NumPy reference: Δ = (c−1)⊙(X̃W₀ᵀ) + s·c⊙(X̃AᵀBᵀ), n fixed
        xd = x.data * c["mask"]
        cc = m.data / n
        delta = (cc - 1) * (xd @ c["w0"].T) + S * cc * (xd @ a.data.T @ b.data.T)
        return Tensor(np.sum(c["G"] * delta))

    inputs = [c["x"], c["m"], c["A"], c["B"]]
    fd = numerical_grad(ref_loss, inputs, index)
    ts = [Tensor(v, requires_grad=True) for v in inputs]
    out = dora_delta(ts[0], Tensor(c["w0"]), ts[1], ts[2], ts[3], S, mask=c["mask"])
    out.backward(c["G"])
    arrays = dict(c, s=np.array(S), norm=n)
    arrays[name] = ts[index].grad
    return Outcome(error=rel_error(ts[index].grad, fd, atol=1e-8), arrays=arrays)


@equation(
    "dora.forward",
    what="H = b + (m/‖W₀+sBA‖_row) ⊙ X·(W₀+sBA)ᵀ (base + DoRA delta)",
    derivation="lora_family.md",
    implements=dora_delta,
    tol=1e-12,
)
def _check_dora_forward() -> Outcome:
    c = _dora_case()
    bias = np.linspace(-1, 1, 4)
    w = c["w0"] + S * c["B"] @ c["A"]
    ref = c["x"] @ (c["m"][:, None] * w / np.linalg.norm(w, axis=1, keepdims=True)).T + bias
    base = c["x"] @ c["w0"].T + bias
    h = (
        base
        + dora_delta(
            Tensor(c["x"]), Tensor(c["w0"]), Tensor(c["m"]), Tensor(c["A"]), Tensor(c["B"]), S
        ).data
    )
    arrays = {k: c[k] for k in ("x", "w0", "m", "A", "B")}
    arrays.update(bias=bias, s=np.array(S), H=ref)
    return Outcome(error=rel_error(h, ref, atol=1e-12), arrays=arrays)


@equation(
    "dora.weight_norm",
    what="n = ‖W₀ + s·B·A‖ per output row",
    derivation="lora_family.md",
    implements=dora_weight_norm,
    tol=1e-12,
)
def _check_dora_norm() -> Outcome:
    c = _dora_case()
    w = c["w0"] + S * c["B"] @ c["A"]
    ref = np.array([np.sqrt(sum(v * v for v in row)) for row in w])  # row by row
    n = dora_weight_norm(c["w0"], c["B"], c["A"], S)
    return Outcome(error=rel_error(n, ref), arrays={"w0": c["w0"], "A": c["A"], "B": c["B"],
                                                    "s": np.array(S), "norm": ref})  # fmt: skip


@equation(
    "dora.merge",
    what="W' = m ⊙ (W₀ + sBA)/‖W₀ + sBA‖_row; rows of W' have norm m",
    derivation="lora_family.md",
    implements=dora_merged_weight,
    tol=1e-12,
)
def _check_dora_merge() -> Outcome:
    c = _dora_case()
    wm = dora_merged_weight(c["w0"], c["B"], c["A"], c["m"], S)
    d = c["w0"] + S * c["B"] @ c["A"]
    cos = np.sum(wm * d, axis=1) / (np.linalg.norm(wm, axis=1) * np.linalg.norm(d, axis=1))
    err = max(rel_error(np.linalg.norm(wm, axis=1), c["m"]), float(np.abs(cos - 1).max()))
    return Outcome(error=err, arrays={"w0": c["w0"], "A": c["A"], "B": c["B"], "m": c["m"],
                                      "s": np.array(S), "W_merged": wm})  # fmt: skip


@equation(
    "dora.grad_m",
    what="∂L/∂m = Σₙ G ⊙ (X̃W₀ᵀ + s·X̃AᵀBᵀ) / n",
    derivation="lora_family.md",
    implements=dora_delta,
    tol=1e-6,
)
def _check_dora_m() -> Outcome:
    return _dora_grad(1, "grad_m")


@equation(
    "dora.grad_A",
    what="∂L/∂A = s·((G⊙c)·B)ᵀ·X̃, c = m/n (n detached)",
    derivation="lora_family.md",
    implements=dora_delta,
    tol=1e-6,
)
def _check_dora_a() -> Outcome:
    return _dora_grad(2, "grad_A")


@equation(
    "dora.grad_B",
    what="∂L/∂B = s·(G⊙c)ᵀ·(X̃Aᵀ), c = m/n (n detached)",
    derivation="lora_family.md",
    implements=dora_delta,
    tol=1e-6,
)
def _check_dora_b() -> Outcome:
    return _dora_grad(3, "grad_B")


@equation(
    "dora.grad_X",
    what="∂L/∂X = [(G⊙(c−1))·W₀ + s·((G⊙c)·B)·A] ⊙ M/(1−p)",
    derivation="lora_family.md",
    implements=dora_delta,
    tol=1e-6,
)
def _check_dora_x() -> Outcome:
    return _dora_grad(0, "grad_X")


# ------------------------------------------------------------------------------ VeRA
def _vera_case() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20)
    return {
        "x": rng.standard_normal((3, 5)),
        "w0": rng.standard_normal((4, 5)),
        "bias": rng.standard_normal(4),
        "A": rng.standard_normal((3, 5)),  # frozen shared projection, sliced (r, in)
        "B": rng.standard_normal((4, 3)),  # (out, r)
        "lambda_b": rng.standard_normal(4),
        "lambda_d": rng.standard_normal(3),
        "G": rng.standard_normal((3, 4)),
    }


def _vera_grad(index: int, name: str) -> Outcome:
    c = _vera_case()

    def f(x, lb, ld):
        return vera_linear(x, Tensor(c["w0"]), Tensor(c["bias"]), lb, ld, c["A"], c["B"])

    inputs = [c["x"], c["lambda_b"], c["lambda_d"]]
    err = gradcheck(f, inputs, wrt=[index]).max_rel_error
    ts = [Tensor(v, requires_grad=True) for v in inputs]
    f(*ts).backward(c["G"])
    return Outcome(error=err, arrays=dict(c, **{name: ts[index].grad}))


@equation(
    "vera.forward",
    what="H = X·W₀ᵀ + b₀ + Λ_b·B·Λ_d·A·X (no α/r)",
    derivation="lora_family.md",
    implements=vera_linear,
    tol=1e-12,
)
def _check_vera_forward() -> Outcome:
    c = _vera_case()
    dw = np.diag(c["lambda_b"]) @ c["B"] @ np.diag(c["lambda_d"]) @ c["A"]  # Λ_b·B·Λ_d·A
    ref = c["x"] @ (c["w0"] + dw).T + c["bias"]
    h = vera_linear(
        Tensor(c["x"]), Tensor(c["w0"]), Tensor(c["bias"]), Tensor(c["lambda_b"]),
        Tensor(c["lambda_d"]), c["A"], c["B"],
    ).data  # fmt: skip
    return Outcome(error=rel_error(h, ref, atol=1e-12), arrays=dict(c, H=ref))


@equation(
    "vera.grad_b",
    what="∂L/∂b = Σₙ G ⊙ ((X̃Aᵀ ⊙ d)·Bᵀ)",
    derivation="lora_family.md",
    implements=vera_linear,
    tol=1e-6,
)
def _check_vera_b() -> Outcome:
    return _vera_grad(1, "grad_lambda_b")


@equation(
    "vera.grad_d",
    what="∂L/∂d = Σₙ ((G ⊙ b)·B) ⊙ (X̃Aᵀ)",
    derivation="lora_family.md",
    implements=vera_linear,
    tol=1e-6,
)
def _check_vera_d() -> Outcome:
    return _vera_grad(2, "grad_lambda_d")


@equation(
    "vera.grad_X",
    what="∂L/∂X = G·W₀ + (((G⊙b)·B) ⊙ d)·A",
    derivation="lora_family.md",
    implements=vera_linear,
    tol=1e-6,
)
def _check_vera_x() -> Outcome:
    return _vera_grad(0, "grad_X")


# ------------------------------------------------------------------------------ IA3
def _ia3(ff: bool, index: int | None) -> Outcome:
    rng = np.random.default_rng(30)
    x, w0, bias = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    l = rng.standard_normal((1, 5) if ff else (4, 1))
    arrays = {"x": x, "w0": w0, "bias": bias, "l": l}
    if index is None:  # forward vs the NumPy formula
        ref = (x * l) @ w0.T + bias if ff else (x @ w0.T + bias) * l.T
        h = ia3_linear(Tensor(x), Tensor(w0), Tensor(bias), Tensor(l), is_feedforward=ff).data
        return Outcome(error=rel_error(h, ref, atol=1e-12), arrays=dict(arrays, H=ref))

    def f(x, l):
        return ia3_linear(x, Tensor(w0), Tensor(bias), l, is_feedforward=ff)

    err = gradcheck(f, [x, l]).max_rel_error
    ts = [Tensor(x, requires_grad=True), Tensor(l, requires_grad=True)]
    g = rng.standard_normal((3, 4))
    f(*ts).backward(g)
    return Outcome(error=err, arrays=dict(arrays, G=g, grad_x=ts[0].grad, grad_l=ts[1].grad))


@equation("ia3.forward_out", what="H = (X·W₀ᵀ + b) ⊙ l (output scaling)",
          derivation="lora_family.md", implements=ia3_linear, tol=1e-12)  # fmt: skip
def _check_ia3_fo() -> Outcome:
    return _ia3(False, None)


@equation("ia3.forward_in", what="H = (X ⊙ l)·W₀ᵀ + b (feed-forward input scaling)",
          derivation="lora_family.md", implements=ia3_linear, tol=1e-12)  # fmt: skip
def _check_ia3_fi() -> Outcome:
    return _ia3(True, None)


@equation("ia3.grad_out", what="∂L/∂l = Σₙ G ⊙ (X·W₀ᵀ + b), ∂L/∂X = (G ⊙ l)·W₀",
          derivation="lora_family.md", implements=ia3_linear, tol=1e-6)  # fmt: skip
def _check_ia3_go() -> Outcome:
    return _ia3(False, 0)


@equation("ia3.grad_in", what="∂L/∂l = Σₙ X ⊙ (G·W₀), ∂L/∂X = (G·W₀) ⊙ l",
          derivation="lora_family.md", implements=ia3_linear, tol=1e-6)  # fmt: skip
def _check_ia3_gi() -> Outcome:
    return _ia3(True, 0)
