"""The digits DDPM: schedule, forward process, loss, sampler, denoiser, checkpoints, CLI."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft import backend
from minipeft.autograd.tensor import Tensor
from minipeft.diffusion import (
    Denoiser,
    DiffusionConfig,
    NoiseSchedule,
    PretrainConfig,
    _main,
    diffusion_loss,
    load_denoiser,
    pretrain,
    read_checkpoint_metadata,
    sample,
    save_denoiser,
)
from minipeft.verify import registry

TINY = DiffusionConfig(
    num_classes=3, num_reserved=2, hidden=8, mlp_hidden=12, n_blocks=1, time_dim=4, T=10
)


def _tiny(seed: int = 0) -> Denoiser:
    backend.seed(seed)
    return Denoiser(TINY)


# ------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("kind,T", [("cosine", 100), ("cosine", 7), ("linear", 100)])
def test_schedule_is_a_valid_noising_sequence(kind, T):
    s = NoiseSchedule(T, kind)
    assert s.betas.shape == (T,)
    assert np.all((s.betas > 0) & (s.betas < 1))
    assert np.all(np.diff(s.alpha_bar) < 0)  # ᾱ strictly decreases
    # ᾱₜ is the running product of 1 − β, written out here
    running, abar = 1.0, []
    for b in s.betas:
        running *= 1.0 - b
        abar.append(running)
    np.testing.assert_allclose(s.alpha_bar, abar, rtol=1e-14)
    assert s.alpha_bar_prev[0] == 1.0
    assert s.alpha_bar[-1] < 0.05  # x_T is nearly pure noise


def test_linear_schedule_matches_ho_et_al_at_T1000():
    s = NoiseSchedule(1000, "linear")
    assert s.betas[0] == pytest.approx(1e-4)
    assert s.betas[-1] == pytest.approx(0.02)


@pytest.mark.parametrize(
    "T,kind,exc",
    [(0, "cosine", ValueError), (10, "sigmoid", ValueError), (10, "linear", ValueError),
     (2.5, "cosine", ValueError)],
)  # fmt: skip
def test_schedule_rejects_bad_input(T, kind, exc):
    with pytest.raises(exc):
        NoiseSchedule(T, kind)  # linear with T=10 would need β = 2 at the end


def test_bad_steps_are_rejected():
    s = NoiseSchedule(10)
    with pytest.raises(ValueError, match="t:"):
        s.q_mean_var(np.zeros((1, 64)), np.array([10]))
    with pytest.raises(TypeError, match="t:"):
        s.q_mean_var(np.zeros((1, 64)), np.array([1.5]))
    with pytest.raises(ValueError, match="t:"):
        s.sampler_step(np.zeros((1, 64)), -1, np.zeros((1, 64)), np.zeros((1, 64)))


# ------------------------------------------------------------------------------ forward process
@pytest.mark.parametrize("t", [0, 30, 99])
def test_forward_process_sampling_statistics(t):
    """Draws of xₜ = √ᾱₜx₀ + √(1−ᾱₜ)ε have mean √ᾱₜx₀ and variance 1−ᾱₜ (within 5σ)."""
    s = NoiseSchedule(100, "cosine")
    rng = np.random.default_rng(t)
    n = 20_000
    x0 = np.tile(rng.uniform(-1, 1, 64), (n, 1))  # one image, n noise draws
    xt = s.q_sample(x0, np.full(n, t), rng.standard_normal((n, 64)))
    abar = np.prod(1.0 - s.betas[: t + 1])
    var = 1.0 - abar
    mean_err = np.abs(xt.mean(0) - math.sqrt(abar) * x0[0])
    assert np.all(mean_err < 5 * math.sqrt(var / n))
    # sample variance: standard error ≈ var·√(2/n)
    assert np.all(np.abs(xt.var(0) - var) < 5 * var * math.sqrt(2 / n))


@settings(max_examples=30)
@given(t=st.integers(0, 99), seed=st.integers(0, 2**16))
def test_predict_x0_inverts_q_sample(t, seed):
    s = NoiseSchedule(100, "cosine")
    rng = np.random.default_rng(seed)
    x0, eps = rng.uniform(-1, 1, (2, 64)), rng.standard_normal((2, 64))
    tt = np.full(2, t)
    np.testing.assert_allclose(s.predict_x0(s.q_sample(x0, tt, eps), tt, eps), x0, atol=1e-7)


def test_clipped_sampler_step_equals_eps_form_when_x0_in_range():
    """With x̂₀ inside [−1, 1] the clip changes nothing: both mean forms agree."""
    s = NoiseSchedule(50, "cosine")
    rng = np.random.default_rng(0)
    x0, eps, z = (
        rng.uniform(-0.9, 0.9, (2, 64)),
        rng.standard_normal((2, 64)),
        rng.standard_normal((2, 64)),
    )
    for t in (0, 10, 49):
        xt = s.q_sample(x0, np.full(2, t), eps)
        a = s.sampler_step(xt, t, eps, z, clip_x0=False)
        b = s.sampler_step(xt, t, eps, z, clip_x0=True)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_registered_checks_pass():
    results = registry.run(registry.select("diffusion.*"))
    assert len(results) == 4
    for r in results:
        assert r.passed, (r.equation.id, r.error, r.note)


# ------------------------------------------------------------------------------ loss
def test_loss_gradient_wrt_prediction_is_two_residual_over_ND():
    """∂L/∂ε̂ = 2(ε̂ − ε)/(N·D), with the network replaced by a leaf tensor ε̂."""
    s = NoiseSchedule(10)
    rng = np.random.default_rng(1)
    x0, eps = rng.uniform(-1, 1, (3, 64)), rng.standard_normal((3, 64))
    e_hat = Tensor(rng.standard_normal((3, 64)), requires_grad=True)
    loss = diffusion_loss(lambda xt, t, c: e_hat, s, x0, 0, np.array([1, 5, 9]), eps)
    np.testing.assert_allclose(loss.item(), np.mean((e_hat.data - eps) ** 2), rtol=1e-12)
    loss.backward()
    np.testing.assert_allclose(e_hat.grad, 2 * (e_hat.data - eps) / (3 * 64), rtol=1e-12)


def test_loss_rejects_bad_batches():
    m, s = _tiny(), NoiseSchedule(TINY.T)
    with pytest.raises(ValueError, match="x0"):
        diffusion_loss(m, s, np.zeros((0, 64)), 0, np.zeros(0, int), np.zeros((0, 64)))
    with pytest.raises(ValueError, match="x0, eps"):
        diffusion_loss(m, s, np.zeros((2, 64)), 0, np.zeros(2, int), np.zeros((2, 63)))


# ------------------------------------------------------------------------------ denoiser
def test_denoiser_shapes_and_token_validation():
    m = _tiny()
    x = Tensor(np.zeros((3, 64), np.float32))
    assert m(x, np.array([0, 1, 2]), np.array([0, 1, 4])).shape == (3, 64)
    assert m(x, 5, 2).shape == (3, 64)  # scalar step and token broadcast to the batch
    with pytest.raises(ValueError, match="unknown token id 5"):
        m(x, 0, np.array([0, 1, 5]))
    with pytest.raises(ValueError, match="unknown token id -1"):
        m(x, 0, -1)
    with pytest.raises(TypeError, match="tokens"):
        m(x, 0, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="xt"):
        m(Tensor(np.zeros((3, 63), np.float32)), 0, 0)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="hidden"):
        DiffusionConfig(hidden=0)
    with pytest.raises(ValueError, match="num_reserved"):
        DiffusionConfig(num_reserved=-1)
    with pytest.raises(ValueError, match="schedule"):
        DiffusionConfig(schedule="quadratic")


# ------------------------------------------------------------------------------ sampler
def test_sampler_is_deterministic_given_the_seed():
    m, s = _tiny(), NoiseSchedule(TINY.T)
    state = backend.rng().bit_generator.state
    a = sample(m, s, np.array([0, 1, 2, 3]), seed=7)
    b = sample(m, s, np.array([0, 1, 2, 3]), seed=7)
    b3 = sample(m, s, np.array([0, 1, 2, 3]), seed=7, batch=3)  # batching: only BLAS rounding
    c = sample(m, s, np.array([0, 1, 2, 3]), seed=8)
    assert a.shape == (4, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, b3, atol=1e-4)
    assert not np.array_equal(a, c)
    assert np.all(np.abs(a) <= 1.0)
    assert backend.rng().bit_generator.state == state  # the global generator is untouched
    with pytest.raises(ValueError, match="tokens"):
        sample(m, s, np.array([], dtype=int))


# ------------------------------------------------------------------------------ training, files
def test_pretrain_is_deterministic_and_leaves_reserved_rows_alone():
    rng = np.random.default_rng(0)
    data = (rng.uniform(-1, 1, (20, 64)).astype(np.float32), rng.integers(0, 3, 20))
    tr = PretrainConfig(steps=5, batch_size=8, seed=3)
    m1, _, l1 = pretrain(TINY, tr, data=data)
    m2, _, l2 = pretrain(TINY, tr, data=data)
    assert l1 == l2
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=k)
    backend.seed(3)
    fresh = Denoiser(TINY)  # the same initialization as pretrain's
    emb = m1.token_emb.weight.data
    np.testing.assert_array_equal(emb[3:], fresh.token_emb.weight.data[3:])  # reserved rows
    assert not np.array_equal(emb[:3], fresh.token_emb.weight.data[:3])  # class rows trained


def test_checkpoint_round_trip(tmp_path):
    m = _tiny(1)
    path = tmp_path / "sub" / "base.safetensors"
    save_denoiser(path, m, extra={"note": "tiny"})
    assert os.listdir(path.parent) == ["base.safetensors"]  # no temporary file left
    meta = read_checkpoint_metadata(path)
    assert meta["config"]["hidden"] == 8 and meta["extra"] == {"note": "tiny"}
    m2, s2 = load_denoiser(path)
    assert m2.config == TINY and s2.T == TINY.T
    x = Tensor(np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32))
    np.testing.assert_array_equal(m(x, 3, 1).data, m2(x, 3, 1).data)


def test_pretrain_cli_writes_a_loadable_checkpoint(tmp_path):
    pytest.importorskip("sklearn", reason="the CLI trains on scikit-learn's digits")
    out = tmp_path / "base.safetensors"
    assert _main(["pretrain", "--out", str(out), "--steps", "2"]) == 0
    meta = read_checkpoint_metadata(out)
    assert meta["config"] == {**DiffusionConfig().__dict__}
    assert meta["extra"]["pretrain"]["steps"] == 2
    model, sched = load_denoiser(out)
    assert sched.T == DiffusionConfig().T
    assert model(Tensor(np.zeros((1, 64), np.float32)), 0, 3).shape == (1, 64)


def test_load_digits_scaling():
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn")
    from minipeft.diffusion import digit_classifier, load_digits

    x, y = load_digits()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    clf, acc = digit_classifier(x, y)
    assert acc > 0.9  # a held-out accuracy, measured on 540 real digits
    assert clf.predict_proba(x[:2].astype(np.float64)).shape == (2, 10)
