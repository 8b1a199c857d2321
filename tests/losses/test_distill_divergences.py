"""Distillation divergences against float64 brute-force twins, hand-worked golden values and their limit identities.

The oracles below share no code with ``tether.losses.distill.divergences``: softmax by exp / sum over the finite
vocabulary slots only (padded ``-inf`` slots are simply absent), KL as Σ a·(log a − log b), AKL's head found by a
Python loop over the sorted teacher probabilities, SinKD's plan by the official multiplicative row / column
normalisation. Shapes are odd (N = 7 positions, V = 13 with two padded slots); the upstream gradient is not 1.
"""

import math

import pytest
import torch

from tether import kl as tkl
from tether.losses.distill import (
    COUPLED_DIVERGENCES,
    DIVERGENCES,
    akl,
    akl_weights,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sinkhorn,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)
from tether.losses.distill import divergences as D

N, V = 7, 13
PADS = [4, 11]
KEEP = [v for v in range(V) if v not in PADS]

# Non-default hyperparameters, so a default silently used instead would show.
HYPER = {
    "forward_kl": {},
    "reverse_kl": {},
    "generalized_jsd": {"beta": 0.3},
    "skew_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.2},
    "total_variation": {},
    "akl": {"mu": 0.6},
    "sinkhorn": {"epsilon": 0.5, "iterations": 7, "scale": 0.3},
}


# ------------------------------------------------------------------------------------------------------------------
# float64 brute-force twins on the kept slots: q = student, p = teacher, both strictly positive there.
# ------------------------------------------------------------------------------------------------------------------


def _probs(z, temperature):
    z = z / temperature
    e = (z - z.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def _kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def _akl(q, p, mu):
    values = []
    for i in range(q.shape[0]):
        order = sorted(range(q.shape[1]), key=lambda v: -p[i, v].item())  # Python's sort is stable
        head, mass = [], 0.0
        for rank, v in enumerate(order):
            mass += p[i, v].item()
            if rank == 0 or mass <= mu:
                head.append(v)
        error = (p[i] - q[i]).detach().abs()
        g_head = error[head].sum()
        w_head = g_head / error.sum()
        values.append(w_head * _kl(p[i], q[i]) + (1 - w_head) * _kl(q[i], p[i]))
    return torch.stack(values)


def _sinkhorn(q, p, epsilon, iterations, scale):
    cost = (q[:, None, :] - p[None, :, :]).abs().sum(-1)
    plan = torch.exp(-cost / epsilon)
    for _ in range(iterations):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    return scale * (plan * cost).sum(1)


ORACLES = {
    "forward_kl": lambda q, p: _kl(p, q),
    "reverse_kl": lambda q, p: _kl(q, p),
    "generalized_jsd": lambda q, p, beta: beta * _kl(p, beta * p + (1 - beta) * q)
    + (1 - beta) * _kl(q, beta * p + (1 - beta) * q),
    "skew_kl": lambda q, p, alpha: _kl(p, alpha * p + (1 - alpha) * q),
    "skew_reverse_kl": lambda q, p, alpha: _kl(q, (1 - alpha) * p + alpha * q),
    "total_variation": lambda q, p: 0.5 * (p - q).abs().sum(-1),
    "akl": lambda q, p, mu: _akl(q, p, mu),
    "sinkhorn": _sinkhorn,
}


def _logits(seed=0, pads=True):
    """Student and teacher logits (N, V) in float64; padded slots -inf in both."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    if pads:
        student[:, PADS] = -math.inf
        teacher[:, PADS] = -math.inf
    upstream = torch.rand(N, generator=g, dtype=torch.float64) * 2 - 0.5  # an upstream gradient that is not 1
    return student, teacher, upstream


def _report(name, got, want, atol):
    bad = ~torch.isclose(got, want, rtol=0, atol=atol)
    if bad.any():
        idx = bad.nonzero()[:10].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} mismatches, first at {idx}: {got[bad][:5]} vs {want[bad][:5]}")


def test_registry_names_are_function_names():
    assert set(DIVERGENCES) == set(HYPER)
    for name, fn in DIVERGENCES.items():
        assert fn.__name__ == name and fn.__doc__
    assert COUPLED_DIVERGENCES == {"sinkhorn"}


@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_value_and_gradient_match_float64_oracle(name, temperature):
    """float64 to 1e-10 and fp32 to 1e-5, values and gradients; padded slots get exactly zero gradient."""
    student, teacher, upstream = _logits()
    hyper = HYPER[name]

    kept = student[:, KEEP].clone().requires_grad_()
    want = ORACLES[name](_probs(kept, temperature), _probs(teacher[:, KEEP], temperature), **hyper)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), kept)

    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        z = student.to(dtype).requires_grad_()
        got = DIVERGENCES[name](z, teacher.to(dtype), temperature=temperature, **hyper)
        assert got.shape == (N,) and got.dtype == dtype
        (grad,) = torch.autograd.grad((got * upstream.to(dtype)).sum(), z)
        _report(f"{name} {dtype} value", got.double(), want.detach(), atol)
        _report(f"{name} {dtype} grad", grad[:, KEEP].double(), want_grad, atol)
        assert (grad[:, PADS] == 0).all(), f"{name}: padded slots must receive exactly zero gradient"


def test_agree_with_tether_kl():
    """The same quantities as ``tether.kl`` (student first there too) at temperature 1, without padded slots."""
    student, teacher, _ = _logits(1, pads=False)
    torch.testing.assert_close(forward_kl(student, teacher), tkl.forward_kl(student, teacher), rtol=0, atol=1e-12)
    torch.testing.assert_close(reverse_kl(student, teacher), tkl.reverse_kl(student, teacher), rtol=0, atol=1e-12)
    torch.testing.assert_close(total_variation(student, teacher), tkl.total_variation(student, teacher),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.3),
                               tkl.generalized_jsd(student, teacher, beta=0.3), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# Golden values, worked by hand.
# ------------------------------------------------------------------------------------------------------------------


def _as_logits(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_generalized_jsd_golden():
    """Teacher p = [0.5, 0.5], student q = [0.9, 0.1], β = 0.5 ⇒ M = ½p + ½q = [0.7, 0.3];
    KL(p‖M) = 0.5·ln(0.5/0.7) + 0.5·ln(0.5/0.3) = 0.5·(−0.336472 + 0.510826) = 0.087177;
    KL(q‖M) = 0.9·ln(0.9/0.7) + 0.1·ln(0.1/0.3) = 0.226183 − 0.109861 = 0.116322;
    JSD = ½·0.087177 + ½·0.116322 = 0.101749 (≤ log 2 = 0.693147)."""
    value = generalized_jsd(_as_logits([0.9, 0.1]), _as_logits([0.5, 0.5]), beta=0.5)
    assert value.item() == pytest.approx(0.101749, abs=1e-6)


def test_skew_kls_golden():
    """p = [0.5, 0.5], q = [0.9, 0.1], α = 0.1.
    Skew KL: m = 0.1·p + 0.9·q = [0.86, 0.14]; KL(p‖m) = 0.5·ln(0.5/0.86) + 0.5·ln(0.5/0.14)
    = 0.5·(−0.542324 + 1.272966) = 0.365321. (DistiLLM's code returns the cross-entropy −Σ p·ln m = 1.058468,
    which is 0.365321 + H(p) = 0.365321 + ln 2.)
    Skew reverse KL: m = 0.9·p + 0.1·q = [0.54, 0.46]; KL(q‖m) = 0.9·ln(0.9/0.54) + 0.1·ln(0.1/0.46)
    = 0.459743 − 0.152606 = 0.307137."""
    q, p = _as_logits([0.9, 0.1]), _as_logits([0.5, 0.5])
    assert skew_kl(q, p, alpha=0.1).item() == pytest.approx(0.365321, abs=1e-6)
    assert skew_kl(q, p, alpha=0.1).item() + math.log(2) == pytest.approx(1.058468, abs=1e-6)
    assert skew_reverse_kl(q, p, alpha=0.1).item() == pytest.approx(0.307137, abs=1e-6)


def test_akl_golden():
    """p = [0.6, 0.3, 0.1], μ = 0.5: cumulative teacher mass [0.6, 0.9, 1.0] exceeds μ from the first token, which
    stays head anyway ⇒ head = {0}, tail = {1, 2}.
    (a) q = [0.6, 0.2, 0.2]: errors [0, 0.1, 0.1] ⇒ g_head = 0, w_tail = 1 ⇒ AKL = KL(q‖p)
        = 0.2·ln(0.2/0.3) + 0.2·ln(0.2/0.1) = −0.081093 + 0.138629 = 0.057536.
    (b) q = [0.5, 0.4, 0.1]: errors [0.1, 0.1, 0] ⇒ w_head = w_tail = ½;
        KL(p‖q) = 0.6·ln(0.6/0.5) + 0.3·ln(0.3/0.4) = 0.109393 − 0.086305 = 0.023088,
        KL(q‖p) = 0.5·ln(0.5/0.6) + 0.4·ln(0.4/0.3) = −0.091161 + 0.115073 = 0.023912 ⇒ AKL = 0.023500."""
    p = _as_logits([0.6, 0.3, 0.1])
    q_a, q_b = _as_logits([0.6, 0.2, 0.2]), _as_logits([0.5, 0.4, 0.1])
    assert akl(q_a, p).item() == pytest.approx(0.057536, abs=1e-6)
    assert [w.item() for w in akl_weights(q_a, p)] == pytest.approx([0.0, 1.0], abs=1e-12)
    assert akl(q_b, p).item() == pytest.approx(0.023500, abs=1e-6)
    assert [w.item() for w in akl_weights(q_b, p)] == pytest.approx([0.5, 0.5], abs=1e-12)


def test_sinkhorn_golden():
    """N = 1: the plan is [[1]] after one normalisation ⇒ r = s·‖q − p‖₁; q = [0.7, 0.2, 0.1], p = [0.5, 0.3, 0.2]
    ⇒ ‖q − p‖₁ = 0.2 + 0.1 + 0.1 = 0.4, so r = 0.4·s (s = 0.001: 0.0004), and 0 for q = p.
    N = 2 with q_i = p_i and rows a = [0.7, 0.2, 0.1], b = [0.5, 0.3, 0.2]: C = [[0, c], [c, 0]], c = 0.4;
    K = [[1, k], [k, 1]], k = e^{−c/ε}; rows and columns already sum alike, so Π = K / (1 + k) and each share is
    s·c·k/(1 + k): at ε = 0.1, k = e^{−4} = 0.0183156 ⇒ 0.4·0.0183156/1.0183156 = 0.0071945·s — not 0 (entropic
    bias), and the shares sum to the official loss s·Σ_ij Π_ij C_ij = 2·0.0071945·s."""
    q, p = _as_logits([0.7, 0.2, 0.1]), _as_logits([0.5, 0.3, 0.2])
    assert sinkhorn(q, p, scale=1e-3).item() == pytest.approx(0.4e-3, abs=1e-12)
    assert sinkhorn(p, p).item() == 0.0

    rows = _as_logits([0.7, 0.2, 0.1], [0.5, 0.3, 0.2])
    shares = sinkhorn(rows, rows, epsilon=0.1)
    k = math.exp(-4.0)
    assert shares.tolist() == pytest.approx([0.4 * k / (1 + k)] * 2, abs=1e-12)
    assert shares.sum().item() == pytest.approx(2 * 0.0071945, abs=1e-7)


def test_sinkhorn_entropic_bias_vanishes_as_epsilon_shrinks():
    """Same N = 2 identical pair: the share s·c·k/(1+k), k = e^{−c/ε}, falls to 0 with ε (c = 0.4)."""
    rows = _as_logits([0.7, 0.2, 0.1], [0.5, 0.3, 0.2])
    values = []
    for epsilon in (0.2, 0.1, 0.05, 0.02):
        k = math.exp(-0.4 / epsilon)
        share = sinkhorn(rows, rows, epsilon=epsilon, iterations=5)
        assert share.tolist() == pytest.approx([0.4 * k / (1 + k)] * 2, abs=1e-12)
        values.append(share[0].item())
    assert values == sorted(values, reverse=True) and values[-1] < 1e-9


def test_sinkhorn_blockwise_l1_backward_matches_cdist(monkeypatch):
    """The L1 cost's backward, summed over teacher rows in blocks (here forced to one row per block), equals
    autograd through ``torch.cdist(p=1)``."""
    student, teacher, upstream = _logits(3, pads=False)
    monkeypatch.setattr(D, "_L1_BLOCK_ELEMENTS", 1)
    a = student.softmax(-1).requires_grad_()
    b = teacher.softmax(-1)
    weights = torch.randn(N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (got,) = torch.autograd.grad((D._L1Cost.apply(a, b) * weights).sum(), a)
    (want,) = torch.autograd.grad((torch.cdist(a, b, p=1) * weights).sum(), a)
    _report("L1 cost grad", got, want, 1e-12)


# ------------------------------------------------------------------------------------------------------------------
# Limits and identities.
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta, twin", [(0.0, forward_kl), (1.0, reverse_kl)])
def test_generalized_jsd_endpoints_are_exactly_the_kls(beta, twin):
    """TRL's convention: β = 0 is KL(p‖q), β = 1 is KL(q‖p) — bit for bit, values and gradients."""
    student, teacher, upstream = _logits(2)
    z1, z2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    got, want = generalized_jsd(z1, teacher, beta=beta, temperature=1.3), twin(z2, teacher, temperature=1.3)
    assert torch.equal(got, want)
    (got.double() @ upstream).backward()
    (want.double() @ upstream).backward()
    assert torch.equal(z1.grad, z2.grad)


def test_generalized_jsd_near_endpoints_is_beta_times_kl():
    """Near β = 0, M = q + β(p − q) and JSD_β = β·KL(p‖M) + (1−β)·KL(q‖M) = β·KL(p‖q) + O(β²) (KL(q‖M) is
    β²/2·χ²(p‖q) to leading order), so JSD_β/β → KL(p‖q) with an error linear in β — while JSD_0 is KL(p‖q) itself:
    the value jumps at the endpoint. Symmetrically JSD_β/(1−β) → KL(q‖p) as β → 1."""
    student, teacher, _ = _logits(4)
    student, teacher = student / 2, teacher / 2  # moderate ratios p/q keep the O(β) coefficient (~ Σ p²/q) small
    fkl, rkl = forward_kl(student, teacher), reverse_kl(student, teacher)
    errors_0 = [(generalized_jsd(student, teacher, beta=b) / b - fkl).abs().max().item() for b in (1e-3, 1e-4)]
    errors_1 = [(generalized_jsd(student, teacher, beta=1 - b) / b - rkl).abs().max().item() for b in (1e-3, 1e-4)]
    for errors in (errors_0, errors_1):
        assert errors[1] < errors[0] / 5  # linear in β
        assert errors[1] < 1e-2


@pytest.mark.parametrize("fn, twin", [(skew_kl, forward_kl), (skew_reverse_kl, reverse_kl)])
def test_skew_kl_endpoints(fn, twin):
    """α = 0: the mixture is the student itself (skew KL) or the teacher itself (skew reverse KL), so the value is
    exactly the forward / reverse KL; α = 1: the mixture is the first argument of the KL, so it is exactly 0 — a
    constant of the student for the skew KL (KL(p‖p): no graph), zero gradient for the skew reverse KL."""
    student, teacher, _ = _logits(5)
    assert torch.equal(fn(student, teacher, alpha=0.0), twin(student, teacher))
    z = student.clone().requires_grad_()
    zero = fn(z, teacher, alpha=1.0)
    assert (zero == 0).all()
    if zero.requires_grad:
        zero.sum().backward()
        assert (z.grad == 0).all()
    else:
        assert fn is skew_kl


def test_akl_limits():
    """μ ≥ 1.01: every token is head ⇒ (w_head, w_tail) = (1, 0) and AKL = KL(p‖q). A student exact on the head
    (here: the teacher's top token) ⇒ g_head = 0 ⇒ AKL = KL(q‖p). Weights always sum to one."""
    student, teacher, _ = _logits(6)
    w_head, w_tail = akl_weights(student, teacher, mu=1.01)
    assert (w_head == 1).all() and (w_tail == 0).all()
    torch.testing.assert_close(akl(student, teacher, mu=1.01), forward_kl(student, teacher), rtol=0, atol=1e-15)

    p, q = teacher.softmax(-1), student.softmax(-1)
    top = p.argmax(-1, keepdim=True)
    rest = q.scatter(-1, top, 0.0)
    q_exact_head = (rest * (1 - p.gather(-1, top)) / rest.sum(-1, keepdim=True)).scatter(-1, top, p.gather(-1, top))
    student_exact_head = q_exact_head.log()
    w_head, w_tail = akl_weights(student_exact_head, teacher, mu=0.01)  # head = the top token alone
    assert w_head.abs().max() < 1e-12
    torch.testing.assert_close(akl(student_exact_head, teacher, mu=0.01), reverse_kl(student_exact_head, teacher),
                               rtol=0, atol=1e-12)

    for mu in (0.0, 0.3, 0.5, 0.9):
        w_head, w_tail = akl_weights(student, teacher, mu=mu)
        assert ((w_head >= 0) & (w_head <= 1)).all()
        assert torch.equal(w_head + w_tail, torch.ones_like(w_head))


def test_akl_identical_distributions_no_nan():
    """q = p exactly: the official g_head/(g_head + g_tail) is 0/0; here the weights are ½, ½ and AKL is 0 with a
    zero gradient."""
    _, teacher, _ = _logits(7)
    z = teacher.clone().requires_grad_()
    assert [w.tolist() for w in akl_weights(z, teacher)] == [[0.5] * N, [0.5] * N]
    value = akl(z, teacher)
    assert (value == 0).all()
    value.sum().backward()
    assert (z.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(set(DIVERGENCES) - COUPLED_DIVERGENCES))
def test_zero_for_identical_distributions(name, dtype):
    """D(p, p) = 0 with a zero gradient for every per-position divergence (the mixtures' logaddexp rounds, hence
    the tolerance)."""
    _, teacher, _ = _logits(8)
    z = teacher.to(dtype).requires_grad_()
    value = DIVERGENCES[name](z, teacher.to(dtype), temperature=0.8, **HYPER[name])
    assert value.abs().max() < 1e-6
    value.sum().backward()
    assert z.grad.abs().max() < 1e-6


def test_sinkhorn_identical_distributions():
    """SinKD's documented behaviour: 0 for N = 1 or when every position has the same distribution (the cost matrix
    is then 0); positive for N > 1 distinct positions (see ``test_sinkhorn_golden`` for the exact value)."""
    _, teacher, _ = _logits(9)
    assert (sinkhorn(teacher[:1], teacher[:1]) == 0).all()
    same = teacher[:1].expand(N, V)
    assert sinkhorn(same, same).abs().max() < 1e-15
    assert (sinkhorn(teacher, teacher, epsilon=0.5) > 0).all()


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_teacher_receives_no_gradient(name):
    student, teacher, _ = _logits(10)
    z, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    DIVERGENCES[name](z, t, **HYPER[name]).sum().backward()
    assert t.grad is None and z.grad is not None


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_half_precision_inputs_are_computed_in_fp32(name):
    """bf16 logits: the softmax runs in fp32 (the result equals the fp32 computation on the same bf16 values, bit
    for bit) and the gradient comes back in bf16."""
    student, teacher, _ = _logits(11)
    z, t = student.to(torch.bfloat16).requires_grad_(), teacher.to(torch.bfloat16)
    value = DIVERGENCES[name](z, t, temperature=1.3, **HYPER[name])
    assert value.dtype == torch.float32
    assert torch.equal(value, DIVERGENCES[name](z.detach().float(), t.float(), temperature=1.3, **HYPER[name]))
    value.sum().backward()
    assert z.grad.dtype == torch.bfloat16 and z.grad.isfinite().all()


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "total_variation",
                                  "sinkhorn"])
def test_teacher_only_zero_slot_stays_finite(name):
    """A slot the teacher gives probability 0 but the student does not: the forward KL ignores it (p = 0), the
    mixtures keep it positive, TV and Sinkhorn are bounded — finite values and gradients. The reverse KL is +inf
    there, as it should be."""
    student, teacher, _ = _logits(12, pads=False)
    teacher[:, 3] = -math.inf
    z = student.clone().requires_grad_()
    value = DIVERGENCES[name](z, teacher, **HYPER[name])
    value.sum().backward()
    assert value.isfinite().all() and z.grad.isfinite().all()
    assert reverse_kl(student, teacher).isposinf().all()


@pytest.mark.parametrize("call, message", [
    (lambda s, t: generalized_jsd(s, t, beta=1.5), "beta must be in"),
    (lambda s, t: skew_kl(s, t, alpha=-0.1), "alpha must be in"),
    (lambda s, t: skew_reverse_kl(s, t, alpha=2.0), "alpha must be in"),
    (lambda s, t: forward_kl(s, t, temperature=0.0), "temperature must be > 0"),
    (lambda s, t: sinkhorn(s, t, epsilon=0.0), "epsilon must be > 0"),
    (lambda s, t: sinkhorn(s, t, iterations=0), "iterations must be >= 1"),
    (lambda s, t: sinkhorn(s[None], t[None]), "flatten the selected positions"),
    (lambda s, t: reverse_kl(s, t[:, :-1]), "same shape"),
])
def test_invalid_arguments_say_what_to_change(call, message):
    student, teacher, _ = _logits(13)
    with pytest.raises(ValueError, match=message):
        call(student, teacher)
