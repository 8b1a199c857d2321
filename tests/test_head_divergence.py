"""Chunked head divergences against the plain full-logits twin: forward and backward at fp32 atol 1e-5.

Odd shapes (N = 11 positions, student width 6, teacher width 9, vocabulary 37), chunk sizes that do not divide N,
an upstream gradient that is not 1, gradients of the student's hidden states, head weight and bias; and a check
that the chunked path never creates a tensor as large as the (N, V) logits.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tether.head_divergence import KLDirections, head_divergence, head_divergence_plain, head_kl_directions
from tether.losses.distill import COUPLED_DIVERGENCES, DIVERGENCES, forward_kl, reverse_kl

N, H, H_T, V = 11, 6, 9, 37
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


def _inputs(seed=0, n=N, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_()
    teacher = {"teacher_hidden": torch.randn(n, H_T, generator=g).to(dtype),
               "teacher_weight": (torch.randn(V, H_T, generator=g) * 0.5).to(dtype),
               "teacher_bias": (torch.randn(V, generator=g) * 0.1).to(dtype)}
    upstream = torch.rand(n, generator=g) * 2 - 0.5  # not 1
    return hidden, weight, bias, teacher, upstream


def _report(name, got, want, atol):
    bad = ~torch.isclose(got, want, rtol=0, atol=atol)
    if bad.any():
        idx = bad.nonzero()[:10].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} mismatches, first at {idx}: {got[bad][:5]} vs {want[bad][:5]}")


def _both(divergence, chunk_size, temperature=1.3, with_bias=True, dtype=torch.float32, seed=0, uniform=None):
    """``uniform``: an upstream gradient equal at every position (the value), the case whose weight gradient comes
    from the forward pass; None: a different upstream at every position (the recomputing backward)."""
    hidden, weight, bias, teacher, upstream = _inputs(seed, dtype=dtype)
    if uniform is not None:
        upstream = torch.full_like(upstream, uniform)
    params = (hidden, weight, bias) if with_bias else (hidden, weight)
    kw = dict(divergence=divergence, student_bias=bias if with_bias else None, temperature=temperature,
              **teacher, **HYPER[divergence])
    chunked = head_divergence(hidden, weight, chunk_size=chunk_size, **kw)
    grads_c = torch.autograd.grad((chunked * upstream).sum(), params)
    plain = head_divergence_plain(hidden, weight, **kw)
    grads_p = torch.autograd.grad((plain * upstream).sum(), params)
    return chunked, plain, grads_c, grads_p


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_chunked_matches_plain_forward_and_backward(divergence, chunk_size):
    chunked, plain, grads_c, grads_p = _both(divergence, chunk_size)
    assert chunked.shape == (N,) and chunked.dtype == torch.float32
    _report(f"{divergence} value", chunked, plain, 1e-5)
    for name, gc, gp in zip(("hidden", "weight", "bias"), grads_c, grads_p):
        _report(f"{divergence} grad {name}", gc, gp, 1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "akl"])
def test_chunked_matches_plain_without_bias(divergence):
    chunked, plain, grads_c, grads_p = _both(divergence, 5, temperature=1.0, with_bias=False)
    _report("value", chunked, plain, 1e-5)
    for name, gc, gp in zip(("hidden", "weight"), grads_c, grads_p):
        _report(f"grad {name}", gc, gp, 1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd"])
def test_chunked_matches_plain_bf16(divergence):
    """bf16 hidden states and heads: logits are bf16 matmuls (of different shapes in the two paths), softmaxes fp32,
    and the chunked weight gradient is summed chunk by chunk in bf16 (one rounding per chunk, relative 2⁻⁸ each):
    values agree to 1e-3, gradients (of magnitude < 0.5 here) to 1e-2 — a few bf16 steps."""
    chunked, plain, grads_c, grads_p = _both(divergence, 4, dtype=torch.bfloat16)
    assert chunked.dtype == torch.float32 and grads_c[1].dtype == torch.bfloat16
    _report("bf16 value", chunked, plain, 1e-3)
    for name, gc, gp in zip(("hidden", "weight", "bias"), grads_c, grads_p):
        _report(f"bf16 grad {name}", gc.float(), gp.float(), 1e-2)


def test_sinkhorn_never_depends_on_chunking():
    """SinKD couples positions: ``head_divergence`` computes it over all N whatever chunk_size says."""
    hidden, weight, bias, teacher, _ = _inputs(1)
    kw = dict(divergence="sinkhorn", student_bias=bias, **teacher, **HYPER["sinkhorn"])
    plain = head_divergence_plain(hidden, weight, **kw)
    for chunk_size in (1, 4, 64):
        assert torch.equal(head_divergence(hidden, weight, chunk_size=chunk_size, **kw), plain)


def test_teacher_receives_no_gradient():
    hidden, weight, bias, teacher, upstream = _inputs(2)
    teacher = {k: v.clone().requires_grad_() for k, v in teacher.items()}
    (head_divergence(hidden, weight, divergence="reverse_kl", student_bias=bias, chunk_size=3, **teacher)
     * upstream).sum().backward()
    assert all(v.grad is None for v in teacher.values())
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None


def test_no_grad_path_matches():
    hidden, weight, bias, teacher, _ = _inputs(3)
    kw = dict(divergence="skew_reverse_kl", student_bias=bias, **teacher)
    with torch.no_grad():
        chunked = head_divergence(hidden, weight, chunk_size=4, **kw)
    assert not chunked.requires_grad
    _report("no-grad value", chunked, head_divergence_plain(hidden, weight, **kw).detach(), 1e-6)


def test_kl_directions_are_both_exact_kls():
    hidden, weight, bias, teacher, _ = _inputs(4)
    out = head_kl_directions(hidden, weight, student_bias=bias, chunk_size=4, temperature=0.9, **teacher)
    assert isinstance(out, KLDirections) and not out.forward.requires_grad and not out.reverse.requires_grad
    logits = torch.nn.functional.linear(hidden, weight, bias)
    teacher_logits = torch.nn.functional.linear(teacher["teacher_hidden"], teacher["teacher_weight"],
                                                teacher["teacher_bias"])
    _report("forward KL", out.forward, forward_kl(logits, teacher_logits, temperature=0.9).detach(), 1e-6)
    _report("reverse KL", out.reverse, reverse_kl(logits, teacher_logits, temperature=0.9).detach(), 1e-6)


def test_empty_selection():
    hidden, weight, bias, teacher, _ = _inputs(5, n=0)
    out = head_divergence(hidden, weight, divergence="akl", student_bias=bias, **teacher)
    assert out.shape == (0,)
    out.sum().backward()
    assert hidden.grad.shape == (0, H)
    assert head_kl_directions(hidden, weight, **teacher).forward.shape == (0,)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("uniform", [1.0, 1 / 7])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
@pytest.mark.parametrize("divergence", sorted(set(DIVERGENCES) - COUPLED_DIVERGENCES))
def test_chunked_matches_plain_with_uniform_upstream(divergence, chunk_size, uniform):
    """The common case (a sum or token mean of the divergence): the weight and bias gradients are the ones the
    forward pass accumulated, scaled once."""
    chunked, plain, grads_c, grads_p = _both(divergence, chunk_size, uniform=uniform)
    _report(f"{divergence} value", chunked, plain, 1e-5)
    for name, gc, gp in zip(("hidden", "weight", "bias"), grads_c, grads_p):
        _report(f"{divergence} grad {name}", gc, gp, 1e-5)


@pytest.mark.parametrize("first_uniform", [True, False])
def test_second_backward_through_retained_graph_recomputes(first_uniform):
    """A second backward (retain_graph) cannot reuse the forward's gradients (the first consumed them): it
    recomputes, and both passes give the plain twin's gradients, whatever the upstream of each."""
    hidden, weight, bias, teacher, upstream = _inputs(7)
    kw = dict(divergence="generalized_jsd", student_bias=bias, **teacher, **HYPER["generalized_jsd"])
    params = (hidden, weight, bias)
    out = head_divergence(hidden, weight, chunk_size=4, **kw)
    plain = head_divergence_plain(hidden, weight, **kw)
    first = torch.ones_like(upstream) if first_uniform else upstream
    for up in (first, upstream if first_uniform else torch.ones_like(upstream)):
        got = torch.autograd.grad((out * up).sum(), params, retain_graph=True)
        want = torch.autograd.grad((plain * up).sum(), params, retain_graph=True)
        for name, gc, gp in zip(("hidden", "weight", "bias"), got, want):
            _report(f"grad {name}", gc, gp, 1e-5)


@pytest.mark.parametrize("divergence", sorted(set(DIVERGENCES) - COUPLED_DIVERGENCES))
def test_chunked_path_never_builds_all_logits(divergence):
    """N = 64 positions, chunk 4, V = 37: no operator in forward or backward returns more elements than the largest of
    one chunk's logits (4·37), the heads (37·9) and the hidden states or their gradient (64·9, the teacher's width) —
    far below the (N, V) = 64·37 logits that the plain twin builds (checked too, so the probe is known to see them)."""
    n, chunk = 64, 4
    hidden, weight, bias, teacher, upstream = _inputs(6, n=n)
    kw = dict(divergence=divergence, student_bias=bias, **teacher, **HYPER[divergence])
    with _LargestTensor() as probe:
        (head_divergence(hidden, weight, chunk_size=chunk, **kw) * upstream).sum().backward()
    assert probe.largest <= max(chunk * V, V * H_T, n * H_T) < n * V, probe.largest
    with _LargestTensor() as probe:
        (head_divergence_plain(hidden, weight, **kw) * upstream).sum().backward()
    assert probe.largest >= n * V


@pytest.mark.parametrize("kwargs, error, message", [
    ({"divergence": "kl"}, ValueError, "unknown divergence"),
    ({"divergence": "skew_kl", "beta": 0.5}, TypeError, "unknown \\['beta'\\]"),
    ({"divergence": "forward_kl", "chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
])
def test_invalid_arguments_say_what_to_change(kwargs, error, message):
    hidden, weight, _, teacher, _ = _inputs(7)
    with pytest.raises(error, match=message):
        head_divergence(hidden, weight, **teacher, **kwargs)


def test_mismatched_shapes_say_what_to_change():
    hidden, weight, _, teacher, _ = _inputs(8)
    with pytest.raises(ValueError, match="vocabularies differ"):
        head_divergence(hidden, weight, divergence="forward_kl", teacher_hidden=teacher["teacher_hidden"],
                        teacher_weight=teacher["teacher_weight"][:-1])
    with pytest.raises(ValueError, match="different positions"):
        head_divergence(hidden, weight, divergence="forward_kl", teacher_hidden=teacher["teacher_hidden"][:-1],
                        teacher_weight=teacher["teacher_weight"])
    with pytest.raises(ValueError, match="must be \\(V, H\\)"):
        head_divergence(hidden, weight[:, :-1], divergence="forward_kl", **teacher)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_closed_form_chunk_gradient_is_autograds(name, temperature):
    """The forward and reverse KL's closed-form (value, ∂/∂logits) against autograd through the divergence
    function itself, in float64 (agreement to float64 rounding, 1e-12), on logits of spread 3 nats."""
    from tether.head_divergence import _CLOSED_FORM

    fn = DIVERGENCES[name]
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(7, V, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(7, V, generator=g, dtype=torch.float64) * 3
    want = fn(z, t, temperature=temperature)
    (want_grad,) = torch.autograd.grad(want.sum(), z)
    grad, value = _CLOSED_FORM[fn](z.detach().clone(), t.clone(), temperature)
    assert value.dtype == torch.float64
    _report(f"{name} value", value, want.detach(), 1e-12)
    _report(f"{name} grad", grad, want_grad, 1e-12)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_closed_form_is_taken_and_padded_vocabulary_falls_back(name, monkeypatch):
    """Finite chunks go through the closed form (counted); a vocabulary slot at −inf in both models (padded
    vocabulary: 0·log 0 = 0) makes the closed form's product 0·(−inf − −inf), and the chunk is differentiated by
    autograd instead: the result still equals the plain twin, with finite gradients."""
    import tether.head_divergence as hd

    fn = DIVERGENCES[name]
    calls = []
    closed = hd._CLOSED_FORM[fn]
    monkeypatch.setitem(hd._CLOSED_FORM, fn, lambda *a: calls.append(1) or closed(*a))
    for padded in (False, True):
        hidden, weight, bias, teacher, upstream = _inputs(5)
        if padded:
            with torch.no_grad():
                bias[-2:] = float("-inf")
                teacher["teacher_bias"][-2:] = float("-inf")
        kw = dict(divergence=name, student_bias=bias, temperature=1.3, **teacher)
        calls.clear()
        chunked = head_divergence(hidden, weight, chunk_size=4, **kw)
        grads_c = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight))
        plain = head_divergence_plain(hidden, weight, **kw)
        grads_p = torch.autograd.grad((plain * upstream).sum(), (hidden, weight))
        assert len(calls) >= 3  # 11 positions in chunks of 4, forward and the recomputing backward
        _report(f"{name} padded={padded} value", chunked, plain, 1e-5)
        for gc, gp in zip(grads_c, grads_p):
            assert torch.isfinite(gc).all()
            _report(f"{name} padded={padded} grad", gc, gp, 1e-5)
