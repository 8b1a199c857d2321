"""Distillation divergences computed from LM-head hidden states, chunk by chunk, never holding (N, V) logits.

Distilling at every response position needs the student's and the teacher's full next-token distributions: for
N = 8 × 512 positions at SmolLM2's V = 49,152 that is 200M floats per model (800 MB in fp32), and autograd through a
divergence keeps several such tensors for the backward pass. :func:`head_divergence` takes the final hidden states
instead and walks over the positions ``chunk_size`` rows at a time: ``_ChunkedHeadDivergence`` (a custom autograd
function) computes one chunk of student and teacher logits at a time, differentiates the divergence with respect to
that chunk's logits right away (each position's value depends on its own logits only; the forward and reverse KL in
closed form, the others by autograd on the chunk) and accumulates the gradients of the hidden states, the (V, H)
head weight and the bias for an upstream gradient of ones. Backward scales them: the hidden-state rows by their own
upstream gradient, the weight and bias by the common factor when the upstream gradient is the same at every
position (a sum or token mean of the divergence, as the recipes take); for any other upstream gradient it
recomputes the logits chunk by chunk for the weight and bias gradients. Peak extra memory is
O(chunk_size · V) — one chunk's logits and the divergence's intermediates on them — plus one (V, H) weight gradient
held from forward to backward, independent of N. The common case costs what the plain path costs: two head
products in forward (student, teacher) and two for the gradients; the gradient work is done even if backward never
runs.

:func:`head_divergence_plain` is the naive twin on full logits; the two agree forward and backward to fp32 1e-5
(``tests/test_head_divergence.py``). The chunked path does not support double backward.

Inputs (N positions already selected — response tokens with a label; no mask here):

* ``student_hidden`` ``(N, H_s)``, ``student_weight`` ``(V, H_s)``, ``student_bias`` ``(V,)`` or None — gradients
  flow to all three;
* ``teacher_hidden`` ``(N, H_t)``, ``teacher_weight`` ``(V, H_t)``, ``teacher_bias`` ``(V,)`` or None — constants
  (detached); the teacher's width H_t may differ from the student's, the vocabulary V must be shared;
* ``divergence``: a name of ``tether.losses.distill.DIVERGENCES``, its hyperparameters as keywords.

``sinkhorn`` couples positions (``COUPLED_DIVERGENCES``): its value at one position depends on all others, so it
cannot be computed chunk by chunk. :func:`head_divergence` computes it over all N positions at once, exactly as
:func:`head_divergence_plain` does — full (N, V) logits of both models plus SinKD's N × N plan — whatever
``chunk_size`` says; its result never depends on the chunking.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tether.losses.distill import COUPLED_DIVERGENCES, DIVERGENCES
from tether.losses.distill import forward_kl as _forward_kl
from tether.losses.distill import reverse_kl as _reverse_kl

__all__ = ["head_divergence", "head_divergence_plain", "head_kl_directions", "KLDirections"]


def _divergence(name: str, hyperparameters: dict) -> Callable[..., Tensor]:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose from {sorted(DIVERGENCES)}")
    fn = DIVERGENCES[name]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("student_logits", "teacher_logits",
                                                                          "temperature")]
    unknown = sorted(set(hyperparameters) - set(allowed))
    if unknown:
        raise TypeError(f"divergence {name!r} takes the hyperparameters {allowed}; got unknown {unknown}")
    return fn


def _check(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None, teacher_hidden: Tensor,
           teacher_weight: Tensor, teacher_bias: Tensor | None, chunk_size: int = 1) -> None:
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError(f"hidden states must be (N, H) — select the positions first; got student "
                         f"{tuple(student_hidden.shape)}, teacher {tuple(teacher_hidden.shape)}")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student and teacher hidden states cover different positions: {student_hidden.shape[0]} vs "
                         f"{teacher_hidden.shape[0]} rows")
    for who, h, w, b in (("student", student_hidden, student_weight, student_bias),
                         ("teacher", teacher_hidden, teacher_weight, teacher_bias)):
        if w.dim() != 2 or w.shape[1] != h.shape[1]:
            raise ValueError(f"{who} head weight {tuple(w.shape)} must be (V, H) with H = {h.shape[1]}, the width of "
                             f"the {who} hidden states")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"{who} head bias {tuple(b.shape)} must be (V,) = ({w.shape[0]},)")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: V = {student_weight.shape[0]} vs "
                         f"{teacher_weight.shape[0]} (slice the heads to the shared vocabulary)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _chunks(n: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


class _ChunkedHeadDivergence(torch.autograd.Function):
    """divergence(h·Wᵀ + b, h_t·W_tᵀ + b_t) per row, logits built one chunk at a time (see module doc).

    The forward pass also differentiates each chunk (``unit`` gradients: those of ``values.sum()``), because every
    row's value depends on its own logits only. The backward pass then scales them by the upstream gradient: the
    hidden-state gradient row by row (exact for any upstream), the head weight and bias gradients by one factor when
    the upstream gradient is the same for every row (a sum or token mean of the values — what the recipes do). Any
    other upstream gradient, or a second backward through a retained graph, recomputes the logits chunk by chunk
    (:meth:`_recompute`) for the weight and bias gradients."""

    @staticmethod
    def forward(ctx, h, weight, bias, th, tweight, tbias, fn, chunk_size, temperature, hyperparameters):
        ctx.save_for_backward(h, weight, bias, th, tweight, tbias)
        ctx.fn, ctx.chunk_size, ctx.temperature, ctx.hyperparameters = fn, chunk_size, temperature, hyperparameters
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        unit_h = torch.empty_like(h) if need_h else None
        unit_w = torch.zeros_like(weight) if need_w else None
        unit_b = torch.zeros_like(bias) if need_b else None
        values = []
        for sl in _chunks(h.shape[0], chunk_size):
            g, v = _chunk_grad(h[sl], weight, bias, th[sl], tweight, tbias, fn, temperature, hyperparameters, None)
            values.append(v)
            _accumulate(g, h[sl], weight, sl, unit_h, unit_w, unit_b)
        ctx.unit = (unit_h, unit_w, unit_b)
        return torch.cat(values)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        unit, ctx.unit = ctx.unit, None  # consumed: a second backward (retain_graph) recomputes
        if unit is None:
            return (*_ChunkedHeadDivergence._recompute(ctx, grad_out, need_h=True), *(None,) * 7)
        unit_h, unit_w, unit_b = unit
        grad_h = unit_h.mul_(grad_out[:, None].to(unit_h.dtype)) if unit_h is not None else None
        if unit_w is None and unit_b is None:
            return grad_h, None, None, *(None,) * 7
        scale = grad_out[0] if grad_out.numel() else grad_out.new_zeros(())
        if bool((grad_out == scale).all()):
            grad_w = unit_w.mul_(scale.to(unit_w.dtype)) if unit_w is not None else None
            grad_b = unit_b.mul_(scale.to(unit_b.dtype)) if unit_b is not None else None
        else:
            del unit
            _, grad_w, grad_b = _ChunkedHeadDivergence._recompute(ctx, grad_out, need_h=False)
        return grad_h, grad_w, grad_b, *(None,) * 7

    @staticmethod
    def _recompute(ctx, grad_out, *, need_h: bool):
        """Gradients for an arbitrary upstream ``grad_out``, logits recomputed chunk by chunk."""
        h, weight, bias, th, tweight, tbias = ctx.saved_tensors
        need_h = need_h and ctx.needs_input_grad[0]
        need_w, need_b = ctx.needs_input_grad[1:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        for sl in _chunks(h.shape[0], ctx.chunk_size):
            g, _ = _chunk_grad(h[sl], weight, bias, th[sl], tweight, tbias, ctx.fn, ctx.temperature,
                               ctx.hyperparameters, grad_out[sl])
            _accumulate(g, h[sl], weight, sl, grad_h, grad_w, grad_b)
        return grad_h, grad_w, grad_b


def _chunk_grad(h_c, weight, bias, th_c, tweight, tbias, fn, temperature, hyperparameters,
                upstream: Tensor | None) -> tuple[Tensor, Tensor]:
    """One chunk: (∂(Σ_i upstream_i · values_i)/∂logits, values); ``upstream`` None means all ones.

    The forward and reverse KL take their closed-form gradient (:data:`_CLOSED_FORM`) when every value of the chunk
    is finite; any other divergence, or a chunk with an infinite KL, is differentiated by autograd."""
    closed_form = _CLOSED_FORM.get(fn)
    if closed_form is not None and not hyperparameters:
        g, values = closed_form(F.linear(h_c, weight, bias), F.linear(th_c, tweight, tbias), temperature)
        if bool(torch.isfinite(values).all()):
            if upstream is not None:
                g.mul_(upstream[:, None].to(g.dtype))
            return g.to(h_c.dtype), values
        del g, values
    z = F.linear(h_c, weight, bias).requires_grad_()
    teacher_z = F.linear(th_c, tweight, tbias)
    with torch.enable_grad():
        values = fn(z, teacher_z, temperature=temperature, **hyperparameters)
        (g,) = torch.autograd.grad(values, z, torch.ones_like(values) if upstream is None else upstream)
    return g, values.detach()


def _log_softmax_(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / T) over the last dimension, in fp32 (float64 stays), overwriting ``logits`` when it
    already has that dtype."""
    out = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        out.div_(temperature)
    return out.sub_(torch.logsumexp(out, dim=-1, keepdim=True))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a[n, v]·b[n, v] per row, as a batched product (no (N, V) temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _reverse_kl_and_grad(z: Tensor, teacher_z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """KL(q‖p) per row and its gradient with respect to the student logits ``z`` (both overwritten).

    With q = softmax(z/T), p = softmax(t/T) and d = log q − log p, KL = Σ_v q_v d_v, and since
    ∂log q_v/∂z_j = (δ_vj − q_j)/T,

        ∂KL/∂z_j = (1/T)·Σ_v q_v (δ_vj − q_j)(d_v + 1) = (q_j/T)·(d_j − KL).

    Three (N, V) buffers (log q turned into d in place, log p, q) instead of autograd's graph. A slot where q or p is
    0 makes d or the product non-finite, and the caller then takes the autograd twin."""
    log_q = _log_softmax_(z, temperature)
    log_p = _log_softmax_(teacher_z, temperature)
    q = log_q.exp()
    d = log_q.sub_(log_p)
    del log_p
    kl = _rowdot(q, d)
    grad = d.sub_(kl[:, None]).mul_(q)
    return (grad.div_(temperature) if temperature != 1.0 else grad), kl


def _forward_kl_and_grad(z: Tensor, teacher_z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """KL(p‖q) per row and its gradient with respect to the student logits ``z`` (both overwritten):
    KL = Σ_v p_v (log p_v − log q_v), ∂KL/∂z_j = (q_j − p_j)/T (Σ_v p_v = 1). Three (N, V) buffers."""
    log_q = _log_softmax_(z, temperature)
    log_p = _log_softmax_(teacher_z, temperature)
    p = log_p.exp()
    kl = _rowdot(p, log_p.sub_(log_q))
    del log_p
    grad = log_q.exp_().sub_(p)
    return (grad.div_(temperature) if temperature != 1.0 else grad), kl


_CLOSED_FORM: dict[Callable[..., Tensor], Callable[[Tensor, Tensor, float], tuple[Tensor, Tensor]]] = {
    _reverse_kl: _reverse_kl_and_grad, _forward_kl: _forward_kl_and_grad}
"""Divergences whose chunk gradient :func:`_chunk_grad` computes in closed form (autograd is the twin:
``tests/test_head_divergence.py``)."""


def _accumulate(g: Tensor, h_c: Tensor, weight: Tensor, sl: slice, grad_h, grad_w, grad_b) -> None:
    """Chain rule through the chunk's head: rows of grad_h, and the chunk's share of grad_w and grad_b."""
    if grad_h is not None:
        torch.mm(g, weight, out=grad_h[sl])
    if grad_w is not None:
        grad_w.addmm_(g.t(), h_c)
    if grad_b is not None:
        grad_b += g.sum(0)


def head_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    divergence: str,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 512,
    **hyperparameters,
) -> Tensor:
    """Per-position ``divergence`` between student and teacher next-token distributions, from LM-head inputs.

    Args:
        student_hidden: ``(N, H_s)`` student final hidden states (after the final norm) at the selected positions.
        student_weight: ``(V, H_s)`` student LM-head weight; ``student_bias``: ``(V,)`` or None.
        teacher_hidden, teacher_weight, teacher_bias: the teacher's counterparts, ``(N, H_t)``, ``(V, H_t)``,
            ``(V,)`` or None; detached (no gradient flows to them).
        divergence: a name of ``tether.losses.distill.DIVERGENCES``; ``**hyperparameters`` go to it (e.g.
            ``beta=0.5`` for ``generalized_jsd``, ``alpha=0.1`` for the skew KLs, ``mu=0.5`` for ``akl``).
        temperature: divides both models' logits (no T² factor; see ``tether.losses.distill.divergences``).
        chunk_size: positions per chunk; peak extra memory is a few chunk_size × V tensors (the logits of both
            models and the divergence's intermediates on them). Ignored by ``sinkhorn``, which couples all positions
            and is computed over all N at once (full (N, V) logits; see the module docstring).

    Returns:
        ``(N,)`` divergence per position, in fp32 (float64 for float64 inputs), differentiable with respect to
        ``student_hidden``, ``student_weight`` and ``student_bias`` exactly as :func:`head_divergence_plain`.
    """
    fn = _divergence(divergence, hyperparameters)
    _check(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, chunk_size)
    if divergence in COUPLED_DIVERGENCES:
        return head_divergence_plain(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                     divergence=divergence, student_bias=student_bias, teacher_bias=teacher_bias,
                                     temperature=temperature, **hyperparameters)
    th, tweight = teacher_hidden.detach(), teacher_weight.detach()
    tbias = None if teacher_bias is None else teacher_bias.detach()
    n = student_hidden.shape[0]
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    if n == 0:
        return (student_hidden.sum(-1) * 0).to(dtype)  # empty, but attached to the graph: .sum().backward() works
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias))
    if needs_grad:
        return _ChunkedHeadDivergence.apply(student_hidden, student_weight, student_bias, th, tweight, tbias, fn,
                                            chunk_size, temperature, hyperparameters)
    with torch.no_grad():
        return torch.cat([fn(F.linear(student_hidden[sl], student_weight, student_bias),
                             F.linear(th[sl], tweight, tbias), temperature=temperature, **hyperparameters)
                          for sl in _chunks(n, chunk_size)])


def head_divergence_plain(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    divergence: str,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    **hyperparameters,
) -> Tensor:
    """The naive twin of :func:`head_divergence`: full ``(N, V)`` logits of both models, then the divergence, with
    ordinary autograd. For tests, for ``sinkhorn``, and for callers that can afford the logits. ``Shape: (N,)``."""
    fn = _divergence(divergence, hyperparameters)
    _check(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    return fn(F.linear(student_hidden, student_weight, student_bias), teacher_logits, temperature=temperature,
              **hyperparameters)


class KLDirections(NamedTuple):
    """Both directions of the exact per-position KL, for reporting (no gradient)."""

    forward: Tensor
    """KL(p‖q), teacher to student (mass-covering), ``Shape: (N,)``."""
    reverse: Tensor
    """KL(q‖p), student to teacher (mode-seeking), ``Shape: (N,)``."""


@torch.no_grad()
def head_kl_directions(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> KLDirections:
    """Forward KL(p‖q) and reverse KL(q‖p) per position, exact over the vocabulary, chunk by chunk, without gradient
    — what a distillation run logs whatever divergence it trains on. Shapes as :func:`head_divergence`."""
    _check(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, chunk_size)
    forward, reverse = [], []
    for sl in _chunks(student_hidden.shape[0], chunk_size):
        z = F.linear(student_hidden[sl], student_weight, student_bias)
        teacher_z = F.linear(teacher_hidden[sl], teacher_weight, teacher_bias)
        forward.append(_forward_kl(z, teacher_z, temperature=temperature))
        reverse.append(_reverse_kl(z, teacher_z, temperature=temperature))
    if not forward:
        empty = student_hidden.new_zeros(0, dtype=torch.promote_types(student_hidden.dtype, torch.float32))
        return KLDirections(empty, empty.clone())
    return KLDirections(torch.cat(forward), torch.cat(reverse))
