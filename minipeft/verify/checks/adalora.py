"""AdaLoRA's equations (derivations/adalora.md)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from minipeft.autograd import Tensor, gradcheck
from minipeft.peft import adalora
from minipeft.verify import Outcome, equation


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in [(3, 5), (4, 5), (4, 1), (6, 4)]]


@equation("adalora.forward", what="Y = c·(X·Qᵀ ⊙ λᵀ)·Pᵀ equals PEFT's x@(A*E).T@B.T*c",
          derivation="adalora.md", implements=adalora.svd_delta, tol=1e-13)  # fmt: skip
def _forward() -> Outcome:
    x, a, e, b = _inputs()
    c = 8 / (4 + 1e-5)
    y = adalora.svd_delta(Tensor(x), Tensor(a), Tensor(e), Tensor(b), c).data
    ref = c * (x @ (a * e).T @ b.T)
    err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
    return Outcome(
        err, {"x": x, "lora_A": a, "lora_E": e, "lora_B": b, "scaling": np.array(c), "y": y}
    )


@equation("adalora.grad", what="∂L/∂P, ∂L/∂λ, ∂L/∂Q, ∂L/∂X of the SVD update",
          derivation="adalora.md", implements=adalora.SVDDelta, tol=1e-6)  # fmt: skip
def _grad() -> Outcome:
    arrays = _inputs(1)
    res = gradcheck(lambda x, a, e, b: adalora.svd_delta(x, a, e, b, 0.75), arrays)
    ts = [Tensor(v, requires_grad=True) for v in arrays]
    adalora.svd_delta(*ts, 0.75).sum().backward()
    names = ["x", "lora_A", "lora_E", "lora_B"]
    out = dict(zip(names, arrays)) | {f"grad_{n}": t.grad for n, t in zip(names, ts)}
    return Outcome(res.max_rel_error, out, note="")


@equation("adalora.orth_reg", what="R = mean of ‖QQᵀ−I‖_F and ‖PᵀP−I‖_F (PEFT, unsquared)",
          derivation="adalora.md", implements=adalora.orthogonal_penalty, tol=1e-13)  # fmt: skip
def _orth_reg() -> Outcome:
    rng = np.random.default_rng(2)
    q1, q2, p1 = (
        rng.standard_normal((3, 7)),
        rng.standard_normal((2, 5)),
        rng.standard_normal((6, 3)),
    )
    got = adalora.orthogonal_penalty([Tensor(q1), Tensor(q2)], [Tensor(p1)]).item()
    want = (
        np.linalg.norm(q1 @ q1.T - np.eye(3))
        + np.linalg.norm(q2 @ q2.T - np.eye(2))
        + np.linalg.norm(p1.T @ p1 - np.eye(3))
    ) / 3
    return Outcome(abs(got - want) / want, {"Q1": q1, "Q2": q2, "P1": p1, "R": np.array(got)})


@equation("adalora.orth_grad", what="∂‖QQᵀ−I‖_F/∂Q = 2MQ/‖M‖, ∂‖PᵀP−I‖_F/∂P = 2PM/‖M‖",
          derivation="adalora.md", implements=adalora.OrthPenalty, tol=1e-6)  # fmt: skip
def _orth_grad() -> Outcome:
    rng = np.random.default_rng(3)
    q, p = rng.standard_normal((3, 6)), rng.standard_normal((5, 3))
    res = gradcheck(lambda q, p: adalora.orthogonal_penalty([q], [p]), [q, p])
    tq, tp = Tensor(q, requires_grad=True), Tensor(p, requires_grad=True)
    adalora.orthogonal_penalty([tq], [tp]).backward()
    return Outcome(res.max_rel_error, {"Q": q, "P": p, "grad_Q": tq.grad, "grad_P": tp.grad})


@equation(
    "adalora.importance",
    what="EMA sensitivity Ī and uncertainty Ū (closed form, constant I)",
    derivation="adalora.md",
    implements=adalora.RankAllocator.update_ipt,
    tol=1e-13,
)
def _importance() -> Outcome:
    from minipeft import dtype_policy
    from minipeft.nn import Linear

    cfg = adalora.AdaLoraConfig(
        target_modules=["m"], init_r=2, target_r=1, total_step=100, beta1=0.85, beta2=0.7
    )
    with dtype_policy("float64"):
        layer = adalora.SVDLinear(Linear(3, 2), r=2, lora_alpha=8)
    alloc = adalora.RankAllocator({"m": layer}, cfg)
    layer.E.data[:] = [[0.5], [-2.0]]
    layer.E.grad = np.array([[3.0], [0.25]])
    for p in (layer.A, layer.B):
        p.grad = np.ones_like(p.data)
    const = np.abs(layer.E.data * layer.E.grad)
    b1, b2, t = cfg.beta1, cfg.beta2, 12
    for _ in range(t):
        alloc.update_ipt()
    st = alloc.state["m.lora_E"]
    ibar = const * (1 - b1**t)
    ubar = (1 - b2) * const * b1 * (b2**t - b1**t) / (b2 - b1)
    err = max(
        float(np.max(np.abs(st.exp_avg_ipt - ibar) / ibar)),
        float(np.max(np.abs(st.exp_avg_unc - ubar) / ubar)),
    )
    return Outcome(err, {"I": const, "exp_avg_ipt": st.exp_avg_ipt, "exp_avg_unc": st.exp_avg_unc})


@equation("adalora.triplet", what="Sᵢ = s(λᵢ) + mean_j s(Q_ij) + mean_j s(P_ji)",
          derivation="adalora.md", implements=adalora.triplet_scores, tol=1e-14)  # fmt: skip
def _triplet() -> Outcome:
    rng = np.random.default_rng(4)
    sa, se, sb = rng.random((3, 5)), rng.random((3, 1)), rng.random((4, 3))
    got = adalora.triplet_scores(sa, se, sb)
    want = np.array([se[i, 0] + sum(sa[i]) / 5 + sum(sb[:, i]) / 4 for i in range(3)])
    return Outcome(float(np.max(np.abs(got - want))), {"score_A": sa, "score_E": se,
                                                        "score_B": sb, "S": got})  # fmt: skip


@equation("adalora.budget", what="cubic budget b(t) with warm-up and final phase (exact rationals)",
          derivation="adalora.md", implements=adalora.budget_schedule, tol=0.0)  # fmt: skip
def _budget() -> Outcome:
    cfg = adalora.AdaLoraConfig(
        target_modules=["m"], init_r=12, target_r=4, tinit=7, tfinal=11, deltaT=3, total_step=97
    )
    b0, bt = 12 * 9, 4 * 9
    worst = 0
    got_all = []
    for t in range(cfg.total_step + 5):
        got, _ = adalora.budget_schedule(t, cfg, b0, bt)
        if t <= cfg.tinit:
            want = b0
        elif t > cfg.total_step - cfg.tfinal:
            want = bt
        else:
            frac = 1 - Fraction(t - cfg.tinit, cfg.total_step - cfg.tfinal - cfg.tinit)
            want = int((b0 - bt) * frac**3 + bt)  # floor of the exact value
        worst = max(worst, abs(got - want))
        got_all.append(got)
    return Outcome(float(worst), {"budget": np.array(got_all, dtype=np.int64)})
