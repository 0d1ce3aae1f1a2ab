"""DreamBooth-LoRA: the subject, the prior-preservation loss, fine-tuning, drift measures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minipeft import backend
from minipeft.autograd.tensor import Tensor
from minipeft.diffusion import Denoiser, DiffusionConfig, NoiseSchedule, diffusion_loss
from minipeft.peft.dreambooth import (
    DreamBoothConfig,
    class_histogram,
    dreambooth_loss,
    drift_metrics,
    finetune,
    kl_divergence,
    make_subject,
    mark_score,
    stamp_mark,
)
from minipeft.verify import registry

TINY = DiffusionConfig(
    num_classes=3, num_reserved=2, hidden=8, mlp_hidden=12, n_blocks=1, time_dim=4, T=10
)
IDENT, CLS = 3, 1  # a reserved row and a real class of TINY


def _base(seed: int = 0) -> Denoiser:
    backend.seed(seed)
    return Denoiser(TINY)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 64)).astype(np.float32)


def _cfg(**kw) -> DreamBoothConfig:
    base = dict(identifier=IDENT, class_token=CLS, steps=3, inst_batch=4, prior_batch=4, r=2)
    return DreamBoothConfig(**{**base, **kw})


# ------------------------------------------------------------------------------ the subject
def test_stamp_mark_sets_only_the_corner():
    x = _images(3, 0)
    m = stamp_mark(x)
    img, ref = m.reshape(3, 8, 8), x.reshape(3, 8, 8)
    assert np.all(img[:, :2, :2] == 1.0)
    np.testing.assert_array_equal(img[:, 2:, :], ref[:, 2:, :])
    np.testing.assert_array_equal(img[:, :2, 2:], ref[:, :2, 2:])
    np.testing.assert_array_equal(mark_score(m), np.ones(3))
    with pytest.raises(ValueError, match="images"):
        stamp_mark(np.zeros((2, 63)))


def test_make_subject_picks_k_images_of_the_digit():
    x, y = _images(30, 1), np.arange(30) % 3
    subj, idx = make_subject(x, y, digit=2, k=4, seed=0)
    assert subj.shape == (4, 64) and np.all(y[idx] == 2)
    np.testing.assert_array_equal(subj, stamp_mark(x[idx]))
    with pytest.raises(ValueError, match="k"):
        make_subject(x, y, digit=2, k=0)
    with pytest.raises(ValueError, match="digit"):
        make_subject(x, y, digit=2, k=11)


# ------------------------------------------------------------------------------ the loss
def _batches(seed: int = 0):
    rng = np.random.default_rng(seed)
    mk = lambda n: (  # noqa: E731
        rng.uniform(-1, 1, (n, 64)).astype(np.float32),
        rng.integers(0, TINY.T, n),
        rng.standard_normal((n, 64)).astype(np.float32),
    )
    return mk(2), mk(3)


def test_loss_is_instance_plus_lambda_prior():
    m, s = _base(), NoiseSchedule(TINY.T)
    (xi, ti, ei), (xp, tp, ep) = _batches()
    kw = dict(identifier=IDENT, class_token=CLS, t_inst=ti, eps_inst=ei, t_prior=tp, eps_prior=ep)
    out = dreambooth_loss(m, s, xi, xp, lam=2.5, **kw)
    # each term is the plain DDPM loss with its own token (the reference is diffusion_loss)
    l_i = diffusion_loss(m, s, xi, IDENT, ti, ei).item()
    l_p = diffusion_loss(m, s, xp, CLS, tp, ep).item()
    assert out.instance.item() == pytest.approx(l_i, rel=1e-6)
    assert out.prior.item() == pytest.approx(l_p, rel=1e-6)
    assert out.total.item() == pytest.approx(l_i + 2.5 * l_p, rel=1e-6)
    zero = dreambooth_loss(m, s, xi, None, lam=0, identifier=IDENT, class_token=CLS,
                           t_inst=ti, eps_inst=ei)  # fmt: skip
    assert zero.prior is None and zero.total.item() == pytest.approx(l_i, rel=1e-6)


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf"), "1"])
def test_loss_rejects_bad_lambda(lam):
    m, s = _base(), NoiseSchedule(TINY.T)
    (xi, ti, ei), (xp, tp, ep) = _batches()
    with pytest.raises(ValueError, match="lam"):
        dreambooth_loss(m, s, xi, xp, lam=lam, identifier=IDENT, class_token=CLS, t_inst=ti,
                        eps_inst=ei, t_prior=tp, eps_prior=ep)  # fmt: skip


def test_loss_rejects_empty_instances_and_missing_prior():
    m, s = _base(), NoiseSchedule(TINY.T)
    (xi, ti, ei), _ = _batches()
    with pytest.raises(ValueError, match="x_inst"):
        dreambooth_loss(m, s, xi[:0], None, lam=0, identifier=IDENT, class_token=CLS,
                        t_inst=ti[:0], eps_inst=ei[:0])  # fmt: skip
    with pytest.raises(ValueError, match="x_prior"):
        dreambooth_loss(m, s, xi, None, lam=1, identifier=IDENT, class_token=CLS, t_inst=ti,
                        eps_inst=ei)  # fmt: skip


def test_registered_checks_pass():
    results = registry.run(registry.select("dreambooth.*"))
    assert len(results) == 2
    for r in results:
        assert r.passed, (r.equation.id, r.error, r.note)


# ------------------------------------------------------------------------------ fine-tuning
def test_finetune_trains_only_lora_and_leaves_the_base_bit_identical():
    base, s = _base(), NoiseSchedule(TINY.T)
    before = {k: v.copy() for k, v in base.state_dict().items()}
    x = Tensor(_images(5, 2))
    t = np.array([0, 3, 5, 7, 9])
    out_base = base(x, t, CLS).data.copy()
    model, hist = finetune(base, s, _images(3, 3), _cfg(lam=1.0, steps=4),
                           prior_images=_images(6, 4))  # fmt: skip
    assert len(hist["instance"]) == 4 and all(np.isfinite(hist["prior"]))
    for k, v in base.state_dict().items():  # the caller's model is not modified
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    for k, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, k  # frozen weights never get a gradient buffer
    with model.disable_adapter():  # adapters off: the class token's output is θ₀'s, bit for bit
        np.testing.assert_array_equal(model(x, t, CLS).data, out_base)
    assert not np.array_equal(model(x, t, CLS).data, out_base)  # with them: it moved


def test_finetune_is_deterministic():
    base, s = _base(), NoiseSchedule(TINY.T)
    kw = dict(prior_images=_images(6, 4))
    _, h1 = finetune(base, s, _images(3, 3), _cfg(), **kw)
    _, h2 = finetune(base, s, _images(3, 3), _cfg(), **kw)
    assert h1 == h2


def test_lambda_zero_ignores_the_prior_set():
    base, s = _base(), NoiseSchedule(TINY.T)
    _, hist = finetune(base, s, _images(3, 3), _cfg(lam=0.0))
    assert all(math.isnan(v) for v in hist["prior"])


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lam=-1.0), "lam"),
        (dict(identifier=7), "identifier: unknown token id 7"),
        (dict(identifier=CLS), "identifier"),  # a real class is not a new identifier
        (dict(class_token=4), "class_token"),
    ],
)
def test_finetune_rejects_bad_config(kw, match):
    base, s = _base(), NoiseSchedule(TINY.T)
    with pytest.raises(ValueError, match=match):
        finetune(base, s, _images(3, 3), _cfg(**kw), prior_images=_images(4, 1))


def test_finetune_rejects_an_empty_instance_set():
    base, s = _base(), NoiseSchedule(TINY.T)
    with pytest.raises(ValueError, match="instance_images"):
        finetune(base, s, np.zeros((0, 64), np.float32), _cfg(), prior_images=_images(4, 1))
    with pytest.raises(ValueError, match="prior_images"):
        finetune(base, s, _images(3, 3), _cfg(), prior_images=np.zeros((0, 64)))


# ------------------------------------------------------------------------------ measurement
def test_kl_divergence_hand_values():
    assert kl_divergence([0.2, 0.8], [0.2, 0.8]) == 0.0
    # KL([½, ½] ‖ [¼, ¾]) = ½·ln 2 + ½·ln(2/3)
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(expected, rel=1e-14)
    assert kl_divergence([0.5, 0.5], [1.0, 0.0]) == math.inf
    assert kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2), rel=1e-14)


def test_class_histogram_smoothing():
    h = class_histogram(np.array([3, 3, 1]), n_classes=4)
    np.testing.assert_allclose(h, np.array([0.5, 1.5, 0.5, 2.5]) / 5.0)


class _Always:
    """A stand-in classifier that predicts one class."""

    def __init__(self, c: int) -> None:
        self.c = c

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.c)


def test_drift_metrics_on_constructed_samples():
    subj = stamp_mark(_images(2, 5))
    blank = stamp_mark(_images(3, 6)) * 0 - 1.0  # all pixels −1: unmarked
    m = drift_metrics(subj, _Always(3), subj, digit=3)
    assert m == {"frac_digit": 1.0, "frac_marked": 1.0, "nn_subject": 0.0}
    m2 = drift_metrics(blank, _Always(5), subj, digit=3, real_class_images=blank[:1],
                       reference_hist=class_histogram(np.full(3, 5)))  # fmt: skip
    assert m2["frac_digit"] == 0.0 and m2["frac_marked"] == 0.0
    assert m2["nn_real"] == 0.0 and m2["kl_to_ref"] == 0.0
    d = np.sqrt(((blank[0] - subj) ** 2).sum(1)).min()
    assert m2["nn_subject"] == pytest.approx(d, rel=1e-6)
