"""Preference objectives against plain float64 twins, hand-worked golden values, and the recipe contract.

Every objective in ``tether.losses.preference`` is compared with a straightforward re-implementation written
here from the equation in its docstring (``torch.log(torch.sigmoid(·))``, ``1 − σ``, explicit ratios ``u = e^ρ`` ...),
in float64, forward AND backward: the library runs in fp32 with an upstream gradient ``w ≠ 1`` on an odd batch of
7, the twin in float64 on the same values; losses, rewards and the gradients w.r.t. all four log-prob inputs
and every differentiable extra must agree to ``atol = rtol = 1e-5`` (fp32; mismatching indices are printed).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from tether.losses import (
    PREFERENCE_INPUTS,
    PREFERENCE_LOSSES,
    dpo,
    f_dpo,
    hdpo,
    hinge_dpo,
    ipo,
    kto,
    longpo,
    orpo,
    ra_dpo,
    robust_dpo,
    simpo,
    tdpo,
    tdpo1,
    tdpo2,
)
from tether.testing import assert_close

B = 7  # odd on purpose
ATOL = RTOL = 1e-5  # fp32 vs float64 twin
assert_close = functools.partial(assert_close, atol=ATOL, rtol=RTOL)
LOG2 = math.log(2.0)
LOGP_NAMES = ("pc", "pr", "rc", "rr")
PER_SEQUENCE = {
    "chosen_lengths",
    "rejected_lengths",
    "chosen_seq_kl",
    "rejected_seq_kl",
    "chosen_seq_risk",
    "rejected_seq_risk",
    "chosen_seq_risk_split",
    "rejected_seq_risk_split",
    "chosen_nll",
}


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def make_inputs(seed: int = 0, ratio_scale: float = 2.0) -> dict[str, torch.Tensor]:
    """Random float64 per-sequence inputs (B,): summed log-probs, lengths and extras; cast per use."""
    g = torch.Generator().manual_seed(seed)
    lengths_c = torch.randint(3, 40, (B,), generator=g)
    lengths_r = torch.randint(3, 40, (B,), generator=g)
    # per-token log-probs around −1 so the sums are realistic; log-ratios of order ratio_scale
    pc = -(0.2 + 1.5 * torch.rand(B, generator=g, dtype=torch.float64)) * lengths_c
    pr = -(0.2 + 1.5 * torch.rand(B, generator=g, dtype=torch.float64)) * lengths_r
    rc = pc - ratio_scale * torch.randn(B, generator=g, dtype=torch.float64)
    rr = pr - ratio_scale * torch.randn(B, generator=g, dtype=torch.float64)
    return {
        "pc": pc,
        "pr": pr,
        "rc": rc,
        "rr": rr,
        "chosen_lengths": lengths_c,
        "rejected_lengths": lengths_r,
        "chosen_seq_kl": 3.0 * torch.rand(B, generator=g, dtype=torch.float64),
        "rejected_seq_kl": 3.0 * torch.rand(B, generator=g, dtype=torch.float64),
        "chosen_seq_risk": 3.0 * torch.rand(B, generator=g, dtype=torch.float64) - 0.5,
        "rejected_seq_risk": 3.0 * torch.rand(B, generator=g, dtype=torch.float64) - 0.5,
        "chosen_nll": 0.5 + 2.0 * torch.rand(B, generator=g, dtype=torch.float64),
        "kl_reference": torch.tensor(0.7, dtype=torch.float64),
        "w": torch.randn(B, generator=g, dtype=torch.float64),
        "chosen_seq_risk_split": 3.0 * torch.rand(B, generator=g, dtype=torch.float64) - 0.5,
        "rejected_seq_risk_split": 3.0 * torch.rand(B, generator=g, dtype=torch.float64) - 0.5,
    }


def leaves(values: dict[str, torch.Tensor], names, dtype) -> dict[str, torch.Tensor]:
    """Fresh leaf copies in ``dtype``; floating ones require grad."""
    out = {}
    for name in names:
        v = values[name]
        if v.is_floating_point():
            out[name] = v.to(dtype).detach().clone().requires_grad_(True)
        else:
            out[name] = v.clone()
    return out


def compare_with_twin(fn, twin, extras=(), seed=0, ratio_scale=2.0, **hparams) -> None:
    """Forward + backward of ``fn`` (fp32) against ``twin`` (float64) with an upstream gradient ``w``."""
    values = make_inputs(seed, ratio_scale)
    names = LOGP_NAMES + tuple(extras)
    # both sides see the same fp32-representable numbers; only the arithmetic differs
    values = {k: v.float().double() if v.is_floating_point() else v for k, v in values.items()}
    lib = leaves(values, names, torch.float32)
    ref = leaves(values, names, torch.float64)

    out = fn(lib["pc"], lib["pr"], lib["rc"], lib["rr"], **{k: lib[k] for k in extras}, **hparams)
    want_loss, want_chosen, want_rejected = twin(**ref, **hparams)

    assert out.loss.shape == (B,) and out.chosen_rewards.shape == (B,) and out.rejected_rewards.shape == (B,)
    assert out.loss.dtype == torch.float32
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert_close(out.loss, want_loss, f"{fn.__name__} loss")
    assert_close(out.chosen_rewards, want_chosen, f"{fn.__name__} chosen_rewards")
    assert_close(out.rejected_rewards, want_rejected, f"{fn.__name__} rejected_rewards")

    (out.loss * values["w"].float()).sum().backward()
    (want_loss * values["w"]).sum().backward()
    for name in names:
        if not ref[name].is_floating_point():
            continue
        got = lib[name].grad if lib[name].grad is not None else torch.zeros_like(lib[name])
        want = ref[name].grad if ref[name].grad is not None else torch.zeros_like(ref[name])
        assert_close(got, want, f"{fn.__name__} d/d{name}")


def nls(x):
    """Plain −log σ(x), the twin's way."""
    return -torch.log(torch.sigmoid(x))


def scalar(fn, pc, pr, rc, rr, **kw):
    """Call ``fn`` on python floats (float64, batch of one); return (loss, chosen_reward, rejected_reward).

    Per-sequence keyword inputs become (1,) tensors; hyperparameters and the scalar kl_reference stay as is.
    """
    t = lambda x: None if x is None else torch.tensor([x], dtype=torch.float64)
    kw = {k: (t(v) if k in PER_SEQUENCE else v) for k, v in kw.items()}
    out = fn(t(pc), t(pr), t(rc), t(rr), **kw)
    return out.loss.item(), out.chosen_rewards.item(), out.rejected_rewards.item()


# ----------------------------------------------------------------------------------------------------------
# plain twins (float64, straight from the docstrings' equations)
# ----------------------------------------------------------------------------------------------------------


def twin_dpo(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0, reference_free=False, **_):
    if reference_free:
        rc, rr = torch.zeros_like(rc), torch.zeros_like(rr)
    delta = (pc - rc) - (pr - rr)
    eps = label_smoothing
    loss = (1 - eps) * nls(beta * delta) + eps * nls(-beta * delta)
    return loss, beta * (pc - rc), beta * (pr - rr)


def twin_ipo(
    pc, pr, rc, rr, chosen_lengths=None, rejected_lengths=None, beta=0.1, average_log_prob=True, **_
):
    lc, lr = (chosen_lengths.double(), rejected_lengths.double()) if average_log_prob else (1.0, 1.0)
    rho_w, rho_l = (pc - rc) / lc, (pr - rr) / lr
    return (rho_w - rho_l - 1 / (2 * beta)) ** 2, beta * rho_w, beta * rho_l


def twin_hinge(pc, pr, rc, rr, beta=0.1, **_):
    delta = (pc - rc) - (pr - rr)
    return torch.clamp(1 - beta * delta, min=0), beta * (pc - rc), beta * (pr - rr)


def twin_robust(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1, **_):
    x = beta * ((pc - rc) - (pr - rr))
    eps = label_smoothing
    loss = ((1 - eps) * nls(x) - eps * nls(-x)) / (1 - 2 * eps)
    return loss, beta * (pc - rc), beta * (pr - rr)


def twin_f_dpo(pc, pr, rc, rr, beta=0.1, divergence="reverse_kl", alpha=0.5, **_):
    """The full f'(u) of ``f_dpo``'s table on the explicit ratio u = π_θ/π_ref (constants kept)."""
    f_prime = {
        "reverse_kl": lambda u: 1 + torch.log(u),
        "forward_kl": lambda u: -1 / u,
        "js": lambda u: torch.log(2 * u / (1 + u)),
        "alpha": lambda u: (1 - u ** (-alpha)) / alpha,
    }[divergence]
    s_w, s_l = f_prime(torch.exp(pc - rc)), f_prime(torch.exp(pr - rr))
    # rewards drop f'(1)'s additive constant (1 for reverse KL, log 2 for JS, 1/α for α), as the library does
    const = {"reverse_kl": 1.0, "forward_kl": 0.0, "js": LOG2, "alpha": 1 / alpha}[divergence]
    return nls(beta * (s_w - s_l)), beta * (s_w - const), beta * (s_l - const)


def twin_tdpo(pc, pr, rc, rr, chosen_seq_kl, rejected_seq_kl, variant=2, alpha=0.5, beta=0.1, **_):
    rho_w, rho_l = pc - rc, pr - rr
    if variant == 1:
        z = rho_w - rho_l - (rejected_seq_kl - chosen_seq_kl)
    else:
        z = rho_w - rho_l - alpha * (rejected_seq_kl - chosen_seq_kl.detach())
    return nls(beta * z), beta * (rho_w + chosen_seq_kl), beta * (rho_l + rejected_seq_kl)


def twin_ra_dpo(pc, pr, rc, rr, chosen_seq_risk, rejected_seq_risk, variant=1, alpha=0.5, beta=0.1, **_):
    return twin_tdpo(pc, pr, rc, rr, chosen_seq_risk, rejected_seq_risk, variant, alpha, beta)


def twin_ra_dpo_split(pc, pr, rc, rr, chosen_seq_risk_split, rejected_seq_risk_split, split_risk_ratio, variant=1,
                      alpha=0.5, beta=0.1, **_):
    """split_risk_ratio=True: the margin takes the per-half-quantile risks (computed by the caller)."""
    assert split_risk_ratio
    return twin_tdpo(pc, pr, rc, rr, chosen_seq_risk_split, rejected_seq_risk_split, variant, alpha, beta)


def twin_hdpo(pc, pr, rc, rr, alpha=1.0, beta=0.1, **_):
    r_w, r_l = alpha * beta * pc - beta * rc, alpha * beta * pr - beta * rr
    return nls(r_w - r_l), r_w, r_l


def twin_longpo(pc, pr, rc, rr, chosen_nll, beta=0.01, lambda_po=0.01, **_):
    delta = (pc - rc) - (pr - rr)
    return chosen_nll + lambda_po * nls(beta * delta), beta * (pc - rc), beta * (pr - rr)


def twin_simpo(pc, pr, rc, rr, chosen_lengths, rejected_lengths, beta=2.0, gamma_beta_ratio=0.25, **_):
    r_w, r_l = beta * pc / chosen_lengths.double(), beta * pr / rejected_lengths.double()
    return nls(r_w - r_l - gamma_beta_ratio * beta), r_w, r_l


def twin_orpo(pc, pr, rc, rr, chosen_lengths, rejected_lengths, beta=0.1, **_):
    m_w, m_l = pc / chosen_lengths.double(), pr / rejected_lengths.double()
    p_w, p_l = torch.exp(m_w), torch.exp(m_l)
    log_odds_ratio = torch.log(p_w / (1 - p_w)) - torch.log(p_l / (1 - p_l))
    return -m_w + beta * nls(log_odds_ratio), beta * m_w, beta * m_l


def twin_kto(pc, pr, rc, rr, kl_reference, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, **_):
    z = torch.clamp(kl_reference.detach(), min=0)
    rho_w, rho_l = pc - rc, pr - rr
    loss = desirable_weight * (1 - torch.sigmoid(beta * (rho_w - z))) + undesirable_weight * (
        1 - torch.sigmoid(beta * (z - rho_l))
    )
    return loss, beta * rho_w, beta * rho_l


LENGTHS = ("chosen_lengths", "rejected_lengths")
TWIN_CASES = [
    # (id, fn, twin, extras, hyperparameters, ratio_scale)
    ("dpo", dpo, twin_dpo, (), {}, 2.0),
    ("dpo-beta0.5", dpo, twin_dpo, (), {"beta": 0.5}, 2.0),
    ("cdpo", dpo, twin_dpo, (), {"label_smoothing": 0.2}, 2.0),
    ("dpo-ref-free", dpo, twin_dpo, (), {"reference_free": True}, 2.0),
    ("ipo-avg", ipo, twin_ipo, LENGTHS, {}, 2.0),
    ("ipo-sum", ipo, twin_ipo, (), {"average_log_prob": False, "beta": 0.5}, 2.0),
    ("hinge", hinge_dpo, twin_hinge, (), {"beta": 0.5}, 2.0),
    ("robust", robust_dpo, twin_robust, (), {}, 2.0),
    ("robust-0.3", robust_dpo, twin_robust, (), {"label_smoothing": 0.3, "beta": 0.3}, 2.0),
    ("f-reverse", f_dpo, twin_f_dpo, (), {"divergence": "reverse_kl"}, 1.0),
    ("f-forward", f_dpo, twin_f_dpo, (), {"divergence": "forward_kl"}, 1.0),
    ("f-js", f_dpo, twin_f_dpo, (), {"divergence": "js", "beta": 0.5}, 1.0),
    ("f-alpha0.5", f_dpo, twin_f_dpo, (), {"divergence": "alpha"}, 1.0),
    ("f-alpha0.3", f_dpo, twin_f_dpo, (), {"divergence": "alpha", "alpha": 0.3, "beta": 0.3}, 1.0),
    ("tdpo2", tdpo, twin_tdpo, ("chosen_seq_kl", "rejected_seq_kl"), {}, 2.0),
    ("tdpo1", tdpo, twin_tdpo, ("chosen_seq_kl", "rejected_seq_kl"), {"variant": 1}, 2.0),
    ("tdpo2-a0.8", tdpo, twin_tdpo, ("chosen_seq_kl", "rejected_seq_kl"), {"alpha": 0.8, "beta": 0.3}, 2.0),
    ("ra_dpo1", ra_dpo, twin_ra_dpo, ("chosen_seq_risk", "rejected_seq_risk"), {}, 2.0),
    ("ra_dpo2", ra_dpo, twin_ra_dpo, ("chosen_seq_risk", "rejected_seq_risk"), {"variant": 2}, 2.0),
    ("ra_dpo1-split", ra_dpo, twin_ra_dpo_split, ("chosen_seq_risk_split", "rejected_seq_risk_split"),
     {"split_risk_ratio": True}, 2.0),
    ("ra_dpo2-split", ra_dpo, twin_ra_dpo_split, ("chosen_seq_risk_split", "rejected_seq_risk_split"),
     {"split_risk_ratio": True, "variant": 2}, 2.0),
    ("hdpo-1", hdpo, twin_hdpo, (), {}, 2.0),
    ("hdpo-0.7", hdpo, twin_hdpo, (), {"alpha": 0.7}, 2.0),
    ("longpo", longpo, twin_longpo, ("chosen_nll",), {}, 2.0),
    ("longpo-big", longpo, twin_longpo, ("chosen_nll",), {"beta": 0.2, "lambda_po": 0.5}, 2.0),
    ("simpo", simpo, twin_simpo, LENGTHS, {}, 2.0),
    ("simpo-b10", simpo, twin_simpo, LENGTHS, {"beta": 10.0, "gamma_beta_ratio": 0.4}, 2.0),
    ("orpo", orpo, twin_orpo, LENGTHS, {}, 2.0),
    ("orpo-0.5", orpo, twin_orpo, LENGTHS, {"beta": 0.5}, 2.0),
    ("kto", kto, twin_kto, ("kl_reference",), {}, 2.0),
    (
        "kto-weighted",
        kto,
        twin_kto,
        ("kl_reference",),
        {"desirable_weight": 1.33, "undesirable_weight": 0.8},
        2.0,
    ),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "fn, twin, extras, hparams, ratio_scale", [c[1:] for c in TWIN_CASES], ids=[c[0] for c in TWIN_CASES]
)
def test_matches_plain_twin(fn, twin, extras, hparams, ratio_scale, seed):
    compare_with_twin(fn, twin, extras, seed=seed, ratio_scale=ratio_scale, **hparams)


def test_aliases_match_tdpo():
    values = make_inputs(3)
    args = [values[k].float() for k in LOGP_NAMES]
    kls = {k: values[k].float() for k in ("chosen_seq_kl", "rejected_seq_kl")}
    assert torch.equal(tdpo1(*args, **kls).loss, tdpo(*args, **kls, variant=1).loss)
    assert torch.equal(tdpo2(*args, **kls, alpha=0.3).loss, tdpo(*args, **kls, variant=2, alpha=0.3).loss)


# ----------------------------------------------------------------------------------------------------------
# golden values, worked by hand
# ----------------------------------------------------------------------------------------------------------


def test_dpo_golden():
    """(a) π_θ = π_ref ⇒ Δ = 0 ⇒ L = −log σ(0) = log 2 and ∂L/∂Δ = −β·σ(−βΔ)… = −β/2.
    (b) LP_θ(y_w) = −1, LP_θ(y_l) = −2, LP_ref = −1.5 for both, β = 0.1 ⇒ ρ_w = 0.5, ρ_l = −0.5, Δ = 1,
        L = log(1 + e^{−0.1}) = 0.644397; rewards β·ρ = ±0.05.
    (c) cDPO ε = 0.5: L = ½[softplus(−x) + softplus(x)], symmetric in x = βΔ ⇒ ∂L/∂Δ = 0 at Δ = 0.
    """
    beta = 0.1
    pc = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    out = dpo(
        pc,
        torch.tensor([-4.0], dtype=torch.float64),
        torch.tensor([-3.0], dtype=torch.float64),
        torch.tensor([-4.0], dtype=torch.float64),
        beta=beta,
    )
    assert out.loss.item() == pytest.approx(LOG2, abs=1e-12)
    out.loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-beta / 2, abs=1e-12)  # ∂Δ/∂LP_θ(y_w) = 1

    loss, r_w, r_l = scalar(dpo, -1.0, -2.0, -1.5, -1.5, beta=0.1)
    assert loss == pytest.approx(0.644397, abs=1e-6)
    assert (r_w, r_l) == (pytest.approx(0.05), pytest.approx(-0.05))

    pc = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-4.0], dtype=torch.float64, requires_grad=True)
    out = dpo(pc, pr, pc.detach(), pr.detach(), label_smoothing=0.5)
    out.loss.sum().backward()
    assert out.loss.item() == pytest.approx(LOG2, abs=1e-12)
    assert pc.grad.item() == 0.0 and pr.grad.item() == 0.0


def test_dpo_reference_free_ignores_reference():
    """Reference-free: Δ = LP_θ(y_w) − LP_θ(y_l) = −1 − (−2) = 1 ⇒ L = softplus(−0.1) = 0.644397.
    The reference arguments are ignored and may be None; rewards β·LP_θ = −0.1, −0.2."""
    loss, r_w, r_l = scalar(dpo, -1.0, -2.0, None, None, reference_free=True)
    assert loss == pytest.approx(0.644397, abs=1e-6)
    assert (r_w, r_l) == (pytest.approx(-0.1), pytest.approx(-0.2))


def test_ipo_golden():
    """Δ' = 1, β = 0.1 ⇒ L = (1 − 1/(2·0.1))² = (1 − 5)² = 16; L = 0 exactly at Δ' = 1/(2β) = 5.
    Averaged form: ρ_w = 6 over 3 tokens, ρ_l = 2 over 2 tokens ⇒ Δ' = 2 − 1 = 1 ⇒ 16 as well."""
    assert scalar(ipo, 1.0, 0.0, 0.0, 0.0, average_log_prob=False)[0] == pytest.approx(16.0, abs=1e-12)
    assert scalar(ipo, 5.0, 0.0, 0.0, 0.0, average_log_prob=False)[0] == pytest.approx(0.0, abs=1e-12)
    loss, r_w, r_l = scalar(ipo, 6.0, 2.0, 0.0, 0.0, chosen_lengths=3, rejected_lengths=2)
    assert loss == pytest.approx(16.0, abs=1e-12)
    assert (r_w, r_l) == (pytest.approx(0.2), pytest.approx(0.1))  # β·ρ/|y|


def test_hinge_golden():
    """Δ = 1, β = 0.1 ⇒ max(0, 1 − 0.1) = 0.9; Δ = 10 = 1/β ⇒ 0 (the margin is met); Δ = 0 ⇒ 1."""
    assert scalar(hinge_dpo, -1.0, -2.0, -1.5, -1.5)[0] == pytest.approx(0.9, abs=1e-12)
    assert scalar(hinge_dpo, 5.0, -5.0, 0.0, 0.0)[0] == pytest.approx(0.0, abs=1e-12)
    assert scalar(hinge_dpo, -3.0, -4.0, -3.0, -4.0)[0] == pytest.approx(1.0, abs=1e-12)


def test_robust_golden_and_unbiased():
    """ε = 0.1, β = 0.1, Δ = 1 (x = βΔ = 0.1):
    L = [0.9·softplus(−0.1) − 0.1·softplus(0.1)]/0.8 = [0.9·0.644397 − 0.1·0.744397]/0.8 = 0.631897,
    i.e. softplus(−x) − ε·x/(1 − 2ε) = 0.644397 − 0.0125. At Δ = 0: [(1−ε) − ε]·log 2/(1−2ε) = log 2.
    Unbiasedness (the point of rDPO): (1−ε)·L(Δ) + ε·L(−Δ) = softplus(−βΔ), the clean DPO loss, for every Δ.
    """
    assert scalar(robust_dpo, -1.0, -2.0, -1.5, -1.5)[0] == pytest.approx(0.631897, abs=1e-6)
    assert scalar(robust_dpo, -3.0, -4.0, -3.0, -4.0, label_smoothing=0.3)[0] == pytest.approx(
        LOG2, abs=1e-12
    )
    values = make_inputs(5)
    args = [values[k] for k in LOGP_NAMES]
    flipped = [args[1], args[0], args[3], args[2]]
    for eps in (0.0, 0.1, 0.25, 0.45):
        expected = (1 - eps) * robust_dpo(*args, label_smoothing=eps).loss + eps * robust_dpo(
            *flipped, label_smoothing=eps
        ).loss
        assert_close(expected, dpo(*args).loss, f"rDPO unbiasedness ε={eps}", atol=1e-10, rtol=1e-10)


def test_f_dpo_golden():
    """(a) reverse_kl is DPO bit for bit (same arithmetic: score = ρ).
    (b) α = 1 equals forward KL (−e^{−αρ}/α = −e^{−ρ}); α = 1e-4 matches DPO to ~1e-4 relative, because
        −e^{−αρ}/α = −1/α + ρ − αρ²/2 + … and the constant −1/α cancels in the score difference.
    (c) ρ_w = ρ_l ⇒ equal scores ⇒ L = log 2 for every f.
    (d) ρ_w = 0.5, ρ_l = −0.5, β = 0.1: score differences reverse 1.0, JS log σ(.5) − log σ(−.5) = 0.5,
        α = 0.5: (e^{.25} − e^{−.25})/0.5 = 4 sinh .25 = 1.010449, forward KL e^{.5} − e^{−.5} = 2 sinh .5 =
        1.042191 ⇒ losses softplus(−0.1·diff) = 0.644397 / 0.668460 / 0.643900 / 0.642395.
    """
    values = make_inputs(7)
    args32 = [values[k].float() for k in LOGP_NAMES]
    a, b = dpo(*args32), f_dpo(*args32, divergence="reverse_kl")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.chosen_rewards, b.chosen_rewards)
    assert torch.equal(a.rejected_rewards, b.rejected_rewards)

    args = [values[k] for k in LOGP_NAMES]
    assert_close(
        f_dpo(*args, divergence="alpha", alpha=1.0).loss,
        f_dpo(*args, divergence="forward_kl").loss,
        "α=1 vs forward KL",
        atol=1e-12,
        rtol=1e-12,
    )
    assert_close(
        f_dpo(*args, divergence="alpha", alpha=1e-4).loss, dpo(*args).loss, "α→0 vs DPO", atol=0, rtol=2e-4
    )

    for divergence, alpha in [
        ("reverse_kl", 0.5),
        ("forward_kl", 0.5),
        ("js", 0.5),
        ("alpha", 0.5),
        ("alpha", 0.2),
    ]:
        loss = scalar(f_dpo, -3.0, -7.0, -3.7, -7.7, divergence=divergence, alpha=alpha)[0]  # ρ_w = ρ_l = 0.7
        assert loss == pytest.approx(LOG2, abs=1e-12), divergence

    expected = {"reverse_kl": 0.644397, "js": 0.668460, "alpha": 0.643900, "forward_kl": 0.642395}
    for divergence, want in expected.items():
        assert scalar(f_dpo, -1.0, -2.0, -1.5, -1.5, divergence=divergence)[0] == pytest.approx(
            want, abs=1e-6
        )


def test_f_dpo_extreme_ratios_stay_finite():
    """ρ = −200 in fp32: e^{200} overflows; the clamped exponent (80) keeps loss and gradients finite."""
    pc = torch.tensor([-250.0, -10.0, -300.0], requires_grad=True)
    pr = torch.tensor([-10.0, -250.0, -300.0], requires_grad=True)
    ref = torch.tensor([-50.0, -50.0, -100.0])
    for divergence in ("forward_kl", "alpha", "js"):
        out = f_dpo(pc, pr, ref, ref, divergence=divergence)
        out.loss.sum().backward()
        assert (
            torch.isfinite(out.loss).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
        )
        pc.grad = pr.grad = None


def test_tdpo_golden():
    """(a) π_θ = π_ref (ρ = 0, SeqKL = 0) ⇒ z = 0 ⇒ log 2.
    (b) TDPO2 with α = 0 ⇒ z = Δ ⇒ DPO ("KL weight 0 ⇒ DPO").
    (c) TDPO2: ∂L/∂SeqKL(y_w) = 0 exactly (sg); TDPO1 has a non-zero one.
    (d) ρ_w = 0.5, ρ_l = −0.5, SeqKL_w = 0.2, SeqKL_l = 0.4, β = 0.1, α = 0.5:
        TDPO1 z = 1 − (0.4 − 0.2) = 0.8 ⇒ softplus(−0.08) = 0.653947;
        TDPO2 z = 1 − 0.5·(0.4 − 0.2) = 0.9 ⇒ softplus(−0.09) = 0.649159.
        Rewards β·(ρ + SeqKL) = 0.1·0.7 = 0.07 and 0.1·(−0.1) = −0.01.
    """
    for variant in (1, 2):
        loss = scalar(tdpo, -3.0, -4.0, -3.0, -4.0, chosen_seq_kl=0.0, rejected_seq_kl=0.0, variant=variant)[
            0
        ]
        assert loss == pytest.approx(LOG2, abs=1e-12)

    values = make_inputs(2)
    args = [values[k] for k in LOGP_NAMES]
    kls = {k: values[k] for k in ("chosen_seq_kl", "rejected_seq_kl")}
    assert_close(
        tdpo(*args, **kls, alpha=0.0).loss, dpo(*args).loss, "TDPO2 α=0 vs DPO", atol=1e-12, rtol=1e-12
    )

    for variant, want_zero in ((2, True), (1, False)):
        kl_w = values["chosen_seq_kl"].clone().requires_grad_(True)
        kl_l = values["rejected_seq_kl"].clone().requires_grad_(True)
        loss = tdpo(*args, chosen_seq_kl=kl_w, rejected_seq_kl=kl_l, variant=variant).loss
        g_w, g_l = torch.autograd.grad(loss.sum(), [kl_w, kl_l], allow_unused=True)
        assert (g_w is None or torch.all(g_w == 0)) == want_zero, f"variant {variant}"
        assert g_l is not None and torch.all(g_l != 0)

    kw = {"chosen_seq_kl": 0.2, "rejected_seq_kl": 0.4}
    l1, r_w, r_l = scalar(tdpo, -1.0, -2.0, -1.5, -1.5, variant=1, **kw)
    assert l1 == pytest.approx(0.653947, abs=1e-6)
    assert scalar(tdpo, -1.0, -2.0, -1.5, -1.5, variant=2, **kw)[0] == pytest.approx(0.649159, abs=1e-6)
    assert (r_w, r_l) == (pytest.approx(0.07), pytest.approx(-0.01))


def test_hdpo_golden():
    """(a) α = 1: αβ·(LP_θ,w − LP_θ,l) − β·(LP_ref,w − LP_ref,l) = β·Δ ⇒ DPO.
    (b) α = 0.9, β = 0.1, LP_θ = (−1, −2), LP_ref = (−1.5, −1.5): margin 0.09·1 − 0.1·0 = 0.09
        ⇒ L = softplus(−0.09) = 0.649159.
    (c) π_θ = π_ref: margin (α − 1)·β·(LP_ref,w − LP_ref,l); with LP_ref = (−3, −4), α = 0.5, β = 0.1:
        −0.05 ⇒ L = softplus(0.05) = log(1 + e^{0.05}) = 0.718460 (not log 2 — the documented exception).
    """
    values = make_inputs(4)
    args = [values[k] for k in LOGP_NAMES]
    assert_close(hdpo(*args, alpha=1.0).loss, dpo(*args).loss, "H-DPO α=1 vs DPO", atol=1e-12, rtol=1e-12)
    assert scalar(hdpo, -1.0, -2.0, -1.5, -1.5, alpha=0.9)[0] == pytest.approx(0.649159, abs=1e-6)
    assert scalar(hdpo, -3.0, -4.0, -3.0, -4.0, alpha=0.5)[0] == pytest.approx(math.log1p(math.exp(0.05)))
    assert scalar(hdpo, -3.0, -4.0, -3.0, -4.0, alpha=0.5)[0] == pytest.approx(0.718460, abs=1e-6)


def test_ra_dpo_golden():
    """(a) π_θ = π_ref ⇒ d ≡ 0 ⇒ empty tail ⇒ SeqRisk = 0, ρ = 0 ⇒ log 2 (both variants).
    (b) Ra-DPO2 with α = 0 ⇒ DPO. (c) Ra-DPO2 detaches the chosen risk.
    (d) Same numbers as TDPO (d) with SeqRisk in place of SeqKL: Ra-DPO1 0.653947, Ra-DPO2 0.649159.
    """
    for variant in (1, 2):
        loss = scalar(
            ra_dpo, -3.0, -4.0, -3.0, -4.0, chosen_seq_risk=0.0, rejected_seq_risk=0.0, variant=variant
        )[0]
        assert loss == pytest.approx(LOG2, abs=1e-12)
    values = make_inputs(6)
    args = [values[k] for k in LOGP_NAMES]
    risks = {k: values[k] for k in ("chosen_seq_risk", "rejected_seq_risk")}
    assert_close(
        ra_dpo(*args, **risks, variant=2, alpha=0.0).loss,
        dpo(*args).loss,
        "Ra-DPO2 α=0 vs DPO",
        atol=1e-12,
        rtol=1e-12,
    )
    risk_w = values["chosen_seq_risk"].clone().requires_grad_(True)
    risk_l = values["rejected_seq_risk"].clone().requires_grad_(True)
    loss = ra_dpo(*args, chosen_seq_risk=risk_w, rejected_seq_risk=risk_l, variant=2).loss
    g_w, g_l = torch.autograd.grad(loss.sum(), [risk_w, risk_l], allow_unused=True)
    assert (g_w is None or torch.all(g_w == 0)) and torch.all(g_l != 0)
    kw = {"chosen_seq_risk": 0.2, "rejected_seq_risk": 0.4}
    assert scalar(ra_dpo, -1.0, -2.0, -1.5, -1.5, variant=1, **kw)[0] == pytest.approx(0.653947, abs=1e-6)
    assert scalar(ra_dpo, -1.0, -2.0, -1.5, -1.5, variant=2, **kw)[0] == pytest.approx(0.649159, abs=1e-6)


def test_longpo_golden():
    """(a) λ = 0 ⇒ L = NLL exactly. (b) Reference scored on the long context (ref = the same inputs DPO sees)
    ⇒ (L − NLL)/λ is exactly the DPO loss with the same β. (c) π_θ = π_ref ⇒ L = NLL + λ·log 2:
    NLL 1.3, λ = 0.01 ⇒ 1.3 + 0.00693147 = 1.30693147."""
    values = make_inputs(8)
    args = [values[k] for k in LOGP_NAMES]
    nll = values["chosen_nll"]
    assert torch.equal(longpo(*args, chosen_nll=nll, lambda_po=0.0).loss, nll)
    out = longpo(*args, chosen_nll=nll, lambda_po=0.3, beta=0.05)
    assert_close(
        (out.loss - nll) / 0.3, dpo(*args, beta=0.05).loss, "LongPO PO term vs DPO", atol=1e-12, rtol=1e-10
    )
    assert scalar(longpo, -3.0, -4.0, -3.0, -4.0, chosen_nll=1.3)[0] == pytest.approx(
        1.3 + 0.01 * LOG2, abs=1e-12
    )


def test_simpo_golden():
    """β = 2, γ = 0.25·2 = 0.5; LP_w = −4 over 4 tokens (mean −1), LP_l = −9 over 6 tokens (mean −1.5):
    z = 2·(−1) − 2·(−1.5) − 0.5 = 0.5 ⇒ L = softplus(−0.5) = 0.474077; rewards β·mean = −2, −3.
    Equal means ⇒ z = −γ ⇒ L = softplus(0.5) = 0.974077 (SimPO is NOT log 2 at a tie: the margin γ)."""
    loss, r_w, r_l = scalar(simpo, -4.0, -9.0, None, None, chosen_lengths=4, rejected_lengths=6)
    assert loss == pytest.approx(0.474077, abs=1e-6)
    assert (r_w, r_l) == (pytest.approx(-2.0), pytest.approx(-3.0))
    assert scalar(simpo, -4.0, -6.0, None, None, chosen_lengths=4, rejected_lengths=6)[0] == pytest.approx(
        0.974077, abs=1e-6
    )


def test_orpo_golden():
    """Chosen: 3 tokens with LP = 3·log 0.5 ⇒ mean m_w = log 0.5, odds 0.5/0.5 = 1, log odds 0.
    Rejected: 2 tokens with LP = 2·log 0.2 ⇒ m_l = log 0.2, odds 0.2/0.8 = 1/4, log odds −log 4.
    log odds ratio = log 4 ⇒ −log σ(log 4) = log(1 + 1/4) = 0.223144; NLL = −log 0.5 = 0.693147;
    L = 0.693147 + 0.1·0.223144 = 0.715461; rewards β·m = −0.0693147, −0.160944."""
    loss, r_w, r_l = scalar(
        orpo, 3 * math.log(0.5), 2 * math.log(0.2), None, None, chosen_lengths=3, rejected_lengths=2
    )
    assert loss == pytest.approx(0.715461, abs=1e-6)
    assert (r_w, r_l) == (pytest.approx(-0.0693147, abs=1e-7), pytest.approx(-0.160944, abs=1e-6))


def test_orpo_near_certain_sequences():
    """Mean log-prob −1e-4 (p ≈ 0.9999): log(1 − e^m) via expm1 matches float64; m = 0 stays finite."""
    pc = torch.tensor([-1e-4 * 5, 0.0], requires_grad=True)
    pr = torch.tensor([-2.0, -3.0], requires_grad=True)
    lengths = torch.tensor([5, 5])
    out = orpo(pc, pr, None, None, chosen_lengths=lengths, rejected_lengths=lengths)
    want = twin_orpo(
        pc.detach()[:1].double(), pr.detach()[:1].double(), None, None, lengths[:1], lengths[:1]
    )[0]
    assert_close(out.loss[:1], want, "ORPO near-certain chosen")
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_kto_golden():
    """β = 0.1, ρ_w = 2, ρ_l = −3, KL̂ = 1: 1 − σ(0.1·(2 − 1)) + 1 − σ(0.1·(1 + 3)) = σ(−0.1) + σ(−0.4)
    = 0.475021 + 0.401312 = 0.876333. KL̂ = −0.5 is clamped to 0: σ(−0.2) + σ(−0.3) = 0.875723.
    π_θ = π_ref and KL̂ = 0 ⇒ ½ + ½ = 1 (KTO's neutral value is 1, not log 2). No gradient reaches KL̂."""
    assert scalar(kto, 2.0, -3.0, 0.0, 0.0, kl_reference=1.0)[0] == pytest.approx(0.876333, abs=1e-6)
    assert scalar(kto, 2.0, -3.0, 0.0, 0.0, kl_reference=-0.5)[0] == pytest.approx(0.875723, abs=1e-6)
    assert scalar(kto, -3.0, -4.0, -3.0, -4.0, kl_reference=0.0)[0] == pytest.approx(1.0, abs=1e-12)
    kl = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    values = make_inputs(9)
    pc = values["pc"].clone().requires_grad_(True)
    loss = kto(pc, values["pr"], values["rc"], values["rr"], kl_reference=kl).loss.sum()
    g_pc, g_kl = torch.autograd.grad(loss, [pc, kl], allow_unused=True)
    assert g_kl is None or g_kl.item() == 0.0
    assert torch.all(g_pc < 0)  # raising the chosen log-prob lowers the loss


@pytest.mark.parametrize("name", ["dpo", "robust_dpo", "f_dpo", "tdpo", "tdpo1", "tdpo2", "ra_dpo", "longpo"])
def test_dpo_type_objectives_are_log2_at_init(name):
    """π_θ = π_ref (and zero SeqKL/SeqRisk, zero NLL) ⇒ every DPO-type margin is 0 ⇒ L = −log σ(0) = log 2.
    (IPO is (0 − 1/(2β))², hinge 1, H-DPO/SimPO/ORPO/KTO are not log 2 — tested above.)"""
    values = make_inputs(10)
    for key in ("chosen_seq_kl", "rejected_seq_kl", "chosen_seq_risk", "rejected_seq_risk", "chosen_nll"):
        values[key] = torch.zeros(B, dtype=torch.float64)
    spec = PREFERENCE_LOSSES[name]
    hparams = {"lambda_po": 1.0} if name == "longpo" else {}
    out = spec.fn(
        values["pc"],
        values["pr"],
        values["pc"],
        values["pr"],
        **recipe_extras(spec.needs, values, torch.float64),
        **hparams,
    )
    assert_close(out.loss, torch.full((B,), LOG2, dtype=torch.float64), name, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# the recipe's calling contract and readable errors
# ----------------------------------------------------------------------------------------------------------


def recipe_extras(needs, values, dtype):
    """What the preference recipe builds from ``LossSpec.needs``."""
    out = {}
    if "lengths" in needs:
        out["chosen_lengths"], out["rejected_lengths"] = values["chosen_lengths"], values["rejected_lengths"]
    if "seq_kl" in needs:
        out["chosen_seq_kl"], out["rejected_seq_kl"] = (
            values["chosen_seq_kl"].to(dtype),
            values["rejected_seq_kl"].to(dtype),
        )
    if "seq_risk" in needs:
        out["chosen_seq_risk"] = values["chosen_seq_risk"].to(dtype)
        out["rejected_seq_risk"] = values["rejected_seq_risk"].to(dtype)
    if "kl_reference" in needs:
        out["kl_reference"] = values["kl_reference"].to(dtype)
    if "chosen_nll" in needs:
        out["chosen_nll"] = values["chosen_nll"].to(dtype)
    return out


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_registry_contract(name):
    """Every registered objective runs from the four positional log-probs plus exactly the extras its LossSpec
    names, returns (B,) loss and detached (B,) rewards, and fails with a message naming a missing extra."""
    spec = PREFERENCE_LOSSES[name]
    assert spec.needs <= PREFERENCE_INPUTS
    assert spec.full_vocab == (name in {"tdpo", "tdpo1", "tdpo2", "ra_dpo"})
    values = make_inputs(11)
    pc, pr = values["pc"].float().requires_grad_(), values["pr"].float().requires_grad_()
    rc, rr = (None, None) if not spec.uses_reference else (values["rc"].float(), values["rr"].float())
    out = spec.fn(pc, pr, rc, rr, **recipe_extras(spec.needs, values, torch.float32))
    assert out.loss.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (B,)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.loss.mean().backward()
    assert torch.isfinite(pc.grad).all() and pc.grad.abs().sum() > 0

    for missing in spec.needs - {"kl_reference", "chosen_nll"}:
        kwargs = recipe_extras(spec.needs - {missing}, values, torch.float32)
        with pytest.raises(ValueError, match=f"chosen_{missing}"):
            spec.fn(pc, pr, rc, rr, **kwargs)
    for missing in spec.needs & {"kl_reference", "chosen_nll"}:
        with pytest.raises(ValueError, match=missing):
            spec.fn(pc, pr, rc, rr, **recipe_extras(spec.needs - {missing}, values, torch.float32))


def test_bad_hyperparameters_fail_with_a_fix():
    values = make_inputs(12)
    args = [values[k] for k in LOGP_NAMES]
    with pytest.raises(ValueError, match="choose one of"):
        f_dpo(*args, divergence="kl")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        f_dpo(*args, divergence="alpha", alpha=0.0)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        robust_dpo(*args, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        dpo(*args, label_smoothing=0.7)
    with pytest.raises(ValueError, match="variant must be 1 or 2"):
        tdpo(
            *args, chosen_seq_kl=values["chosen_seq_kl"], rejected_seq_kl=values["rejected_seq_kl"], variant=3
        )
    with pytest.raises(ValueError, match="reference log-probs"):
        dpo(args[0], args[1], None, None)
