"""Per-token log-probabilities, entropy and exact KL, computed from hidden states × LM head in chunks.

A causal LM's logits for a batch of B sequences of length T over a vocabulary V take B·T·V floats — 200 MB in fp32
for 8 × 128 tokens at SmolLM2's V = 49,152, and several copies of that live through the backward pass. tether never
materialises them: ``token_stats`` selects the positions that carry a label (response tokens only — the prompt
never needs its LM head), and walks over them ``chunk_size`` rows at a time, keeping no logits for the backward
pass: ``_ChunkedHeadStats`` (a custom autograd function) saves only its inputs and recomputes one chunk of logits
at a time in backward, so peak extra memory is O(chunk_size · V), independent of batch and length. Its backward
accumulates the head's (V, H) weight gradient in place, over all chunks, into one buffer that it hands to
autograd once; per-chunk activation checkpointing would instead create a fresh (V, H) gradient per chunk and sum
them out of place (113 MB each for SmolLM2 in fp32). ``token_stats_plain`` is the naive twin over full logits; the
two agree forward and backward to fp32 1e-5 (``tests/test_logprobs.py``). The chunked path does not support
double backward (gradients of gradients).

Label alignment (shared with ``tether.data``): ``labels[:, t]`` is the token predicted from position t, i.e.
``input_ids[:, t + 1]``; positions with ``ignore_index`` (prompt, padding, last position) are skipped and report 0.

Statistics (each a (B, T) tensor, zero where masked):

* ``logps``: log π(y_t | s_t) of the label token.
* ``entropy``: H(π(·|s_t)).
* ``kl``: KL(π(·|s_t) ‖ π_ref(·|s_t)) — exact, full vocabulary (reverse KL; needs the reference).
* ``forward_kl``: KL(π_ref(·|s_t) ‖ π(·|s_t)) — TDPO's sequential KL term.
* ``ref_logps``: log π_ref(y_t | s_t) (no gradient).
* ``risk``: Ra-DPO's CVaR-style truncated KL, Σ_v π_ref,v·d_v·1[d_v > Q_{1−c}(d)], d = log π_ref − log π
  (the indicator is not differentiated).
* ``ref_max_logp``: max_v log π_ref^{(T')}(v | s_t), the reference's largest log-probability at temperature
  T' = ``ref_max_temperature`` (the certainty of the critical-token KL; no gradient).

Sparse-support statistics (``SUPPORT_STATS``), each (B, T, K) or (B, T), for objectives that need a distribution on a
few tokens (TROLL) rather than the full vocabulary:

* ``topk_ids``, ``topk_logps``: the K = ``top_k`` most probable tokens of π(·|s_t) and their log-probs, most probable
  first (no gradient: the rollout policy's support, from a scoring pass).
* ``topk_rest``: log Σ_{v ∉ top-K} π(v|s_t), the log-mass of everything else (no gradient).
* ``support_logps``: log π(v|s_t) at given ids ``support_ids`` (B, T, K) — e.g. the rollout policy's ``topk_ids``.
* ``support_rest``: log Σ_{v ∉ support_ids} π(v|s_t), computed as a log-sum-exp over the other tokens (stable when
  the support holds nearly all the mass, where log(1 − Σ_S π) would cancel).

Both rest statistics need K < V (the rest is empty otherwise).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tether import kl as _kl
from tether.distributed import wrapped_training

IGNORE_INDEX = -100
STATS = ("logps", "entropy", "kl", "forward_kl", "ref_logps", "risk", "ref_max_logp")
SUPPORT_STATS = ("topk_ids", "topk_logps", "topk_rest", "support_logps", "support_rest")
_NEEDS_REF = {"kl", "forward_kl", "ref_logps", "risk", "ref_max_logp"}
_REF_ONLY = {"ref_logps", "ref_max_logp"}
_NO_GRAD = {"ref_logps", "ref_max_logp", "topk_ids", "topk_logps", "topk_rest"}
"""Statistics that carry no gradient (constants of the reference, or the rollout policy's support)."""

__all__ = ["token_stats", "token_stats_plain", "lm_head", "hidden_states", "sequence_sums", "STATS", "SUPPORT_STATS",
           "IGNORE_INDEX"]


class _Options(NamedTuple):
    """Per-call options of the statistics (shared by both paths)."""

    risk_confidence: float = 0.95
    top_k: int = 0
    ref_max_scale: float = 1.0
    """T / T': turns the reference logits at the sampling temperature T into logits at ``ref_max_temperature``."""


def _check_stats(stats: Sequence[str], has_ref: bool, top_k: int, support_k: int | None, vocab: int
                 ) -> tuple[str, ...]:
    stats = tuple(stats)
    unknown = [s for s in stats if s not in STATS + SUPPORT_STATS]
    if unknown:
        raise ValueError(f"unknown token statistic(s) {unknown}; choose from {STATS + SUPPORT_STATS}")
    if not has_ref and _NEEDS_REF.intersection(stats):
        raise ValueError(f"statistics {sorted(_NEEDS_REF.intersection(stats))} need the reference's hidden states "
                         "(pass ref_hidden=..., ref_weight=...)")
    if {"topk_ids", "topk_logps", "topk_rest"}.intersection(stats) and not 1 <= top_k < vocab:
        raise ValueError(f"top-k statistics need 1 ≤ top_k < vocabulary size {vocab}, got top_k={top_k}")
    if {"support_logps", "support_rest"}.intersection(stats) and not (support_k and support_k < vocab):
        raise ValueError("support statistics need support_ids (B, T, K) with 1 ≤ K < vocabulary size "
                         f"{vocab}, got K={support_k}")
    return stats


def _rest_logmass(logp: Tensor, ids: Tensor) -> Tensor:
    """log Σ_{v ∉ ids} exp(logp_v) over the last axis: a log-sum-exp with ``ids`` masked to −inf."""
    return logp.scatter(-1, ids, float("-inf")).logsumexp(-1)


def _risk(logp: Tensor, ref_logp: Tensor, confidence: float) -> Tensor:
    """Ra-DPO per-position risk with a linearly interpolated (1 − c)-quantile over the vocabulary."""
    d = ref_logp - logp  # (N, V)
    with torch.no_grad():
        V = d.shape[-1]
        pos = (1.0 - confidence) * (V - 1)
        lo, hi = int(pos), min(int(pos) + 1, V - 1)
        d_lo = torch.kthvalue(d, lo + 1, dim=-1).values
        d_hi = torch.kthvalue(d, hi + 1, dim=-1).values
        threshold = d_lo + (pos - lo) * (d_hi - d_lo)
        mask = d > threshold.unsqueeze(-1)
    return (ref_logp.exp() * torch.where(mask, d, torch.zeros_like(d))).sum(-1)


def _stats_from_logits(logits: Tensor | None, labels: Tensor, ref_logits: Tensor | None, stats: tuple[str, ...],
                       opts: _Options, support_ids: Tensor | None = None) -> list[Tensor]:
    """Statistics for N positions from (N, V) logits (None when only reference statistics are asked for), (N,)
    labels and, for the support statistics, (N, K) ``support_ids``. Shared by both paths."""
    logp = F.log_softmax(logits.float(), dim=-1) if logits is not None else None
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1) if ref_logits is not None else None
    top = logp.detach().topk(opts.top_k, dim=-1) if opts.top_k and set(stats) & {"topk_ids", "topk_logps",
                                                                                    "topk_rest"} else None
    out = []
    for name in stats:
        if name == "logps":
            out.append(logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
        elif name == "entropy":
            out.append(_kl.entropy(logp))
        elif name == "kl":
            out.append(_kl.reverse_kl(logp, ref_logp))
        elif name == "forward_kl":
            out.append(_kl.forward_kl(logp, ref_logp))
        elif name == "ref_logps":
            out.append(ref_logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
        elif name == "risk":
            out.append(_risk(logp, ref_logp, opts.risk_confidence))
        elif name == "ref_max_logp":
            out.append(F.log_softmax(ref_logits.float() * opts.ref_max_scale, dim=-1).amax(-1))
        elif name == "topk_ids":
            out.append(top.indices)
        elif name == "topk_logps":
            out.append(top.values)
        elif name == "topk_rest":
            out.append(_rest_logmass(logp.detach(), top.indices))
        elif name == "support_logps":
            out.append(logp.gather(-1, support_ids))
        elif name == "support_rest":
            out.append(_rest_logmass(logp, support_ids))
    return out


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    logits = F.linear(hidden, weight, bias)
    return logits / temperature if temperature != 1.0 else logits


def _chunks(n: int, chunk_size: int) -> list[slice]:
    return [slice(start, start + chunk_size) for start in range(0, n, chunk_size)]


def _chunk_stats(h_c, y_c, rh_c, sid_c, weight, bias, ref_weight, ref_bias, stats, temperature, opts):
    """Statistics of one chunk of positions (no autograd bookkeeping of its own). The policy's logits are not
    computed when every statistic is the reference's."""
    logits = None if set(stats) <= _REF_ONLY else _project(h_c, weight, bias, temperature)
    ref_logits = None if rh_c is None else _project(rh_c, ref_weight, ref_bias, temperature)
    return _stats_from_logits(logits, y_c, ref_logits, stats, opts, sid_c)


def _rows(x: Tensor | None, sl: slice) -> Tensor | None:
    return None if x is None else x[sl]


class _ChunkedHeadStats(torch.autograd.Function):
    """Statistics of N positions through the LM head, chunk by chunk, with a recomputing backward.

    Forward: (N, H) hidden states ``h``, (N,) labels ``y`` → one (N,) float32 tensor per statistic; nothing of the
    logits is kept. Backward, per chunk of rows: recompute the raw logits z = h_c Wᵀ + b (no graph), take
    g = ∂L/∂z through ``_stats_from_logits`` with autograd (so every statistic's gradient is the same code as the
    plain path's), then ∂L/∂h_c = g W, ∂L/∂W += gᵀ h_c (``addmm_`` into one (V, H) buffer), ∂L/∂b += Σ_rows g.
    The reference inputs (``rh``, ``ref_weight``, ``ref_bias``) and the support ids ``sid`` are constants.
    """

    @staticmethod
    def forward(ctx, h, y, weight, bias, rh, ref_weight, ref_bias, sid, stats, chunk_size, temperature, opts):
        ctx.save_for_backward(h, y, weight, bias, rh, ref_weight, ref_bias, sid)
        ctx.options = (stats, chunk_size, temperature, opts)
        ctx.set_materialize_grads(False)  # a statistic the loss does not use arrives as None and is skipped
        pieces = [_chunk_stats(h[sl], y[sl], _rows(rh, sl), _rows(sid, sl), weight, bias, ref_weight, ref_bias,
                               stats, temperature, opts) for sl in _chunks(h.shape[0], chunk_size)]
        values = tuple(torch.cat([p[k] for p in pieces]) for k in range(len(stats)))
        ctx.mark_non_differentiable(*[v for v, name in zip(values, stats) if name in _NO_GRAD])
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_values):
        h, y, weight, bias, rh, ref_weight, ref_bias, sid = ctx.saved_tensors
        stats, chunk_size, temperature, opts = ctx.options
        need_h, _, need_w, need_b = ctx.needs_input_grad[:4]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        grad_b = torch.zeros_like(bias) if need_b else None
        live = [k for k, name in enumerate(stats) if name not in _NO_GRAD and grad_values[k] is not None]
        if not live:
            return (None,) * 12
        live_stats = tuple(stats[k] for k in live)
        # The reference logits are recomputed only when a statistic with a gradient needs them (a KL that is only
        # logged costs nothing here).
        use_ref = rh is not None and any(name in ("kl", "forward_kl", "risk") for name in live_stats)
        for sl in _chunks(h.shape[0], chunk_size):
            h_c = h[sl]
            if live_stats == ("logps",):
                g = _logps_grad_logits(F.linear(h_c, weight, bias), y[sl], grad_values[live[0]][sl], temperature)
            else:
                z = F.linear(h_c, weight, bias).requires_grad_()
                ref_logits = _project(rh[sl], ref_weight, ref_bias, temperature) if use_ref else None
                with torch.enable_grad():
                    values = _stats_from_logits(z / temperature if temperature != 1.0 else z, y[sl], ref_logits,
                                                live_stats, opts, _rows(sid, sl))
                    (g,) = torch.autograd.grad(values, z, [grad_values[k][sl] for k in live])
                del z, values
            if need_h:
                torch.mm(g, weight, out=grad_h[sl])
            if need_w:
                grad_w = g.t().mm(h_c) if grad_w is None else grad_w.addmm_(g.t(), h_c)
            if need_b:
                grad_b += g.sum(0)
        return grad_h, None, grad_w, grad_b, None, None, None, None, None, None, None, None


def _logps_grad_logits(z: Tensor, labels: Tensor, grad_out: Tensor, temperature: float) -> Tensor:
    """∂L/∂z for L = Σ_n grad_out[n] · log softmax(z[n] / T)[labels[n]], which is
    grad_out · (onehot(label) − softmax(z / T)) / T, computed in ``z``'s own buffer (one (N, V) tensor where
    autograd through ``log_softmax`` and ``gather`` holds four): the common case of DPO and policy-gradient
    losses, which use the log-probs alone."""
    z = z.float()
    if temperature != 1.0:
        z.div_(temperature)
    probs = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True)).exp_()
    g = probs.mul_(-grad_out.unsqueeze(-1))
    g[torch.arange(len(labels), device=g.device), labels] += grad_out
    return g.div_(temperature) if temperature != 1.0 else g


def token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    stats: Sequence[str] = ("logps",),
    chunk_size: int = 512,
    temperature: float = 1.0,
    risk_confidence: float = 0.95,
    top_k: int = 0,
    support_ids: Tensor | None = None,
    ref_max_temperature: float = 1.0,
) -> dict[str, Tensor]:
    """Per-token statistics without materialising (B, T, V) logits.

    Args:
        hidden: (B, T, H) final hidden states of the policy (after the final norm).
        weight: (V, H) LM-head weight; ``bias``: (V,) or None.
        labels: (B, T) next-token labels, ``IGNORE_INDEX`` where no statistic is wanted.
        ref_hidden, ref_weight, ref_bias: the reference model's counterparts (needed by kl / forward_kl /
            ref_logps / risk / ref_max_logp); treated as constants (no gradient flows to them).
        stats: names from ``STATS`` and ``SUPPORT_STATS``.
        chunk_size: label positions per chunk; peak extra memory is about 4·chunk_size·V floats.
        temperature: logits are divided by it (both models) before the softmax.
        risk_confidence: Ra-DPO confidence level c.
        top_k: K of the ``topk_*`` statistics (1 ≤ K < V).
        support_ids: (B, T, K) token ids for ``support_logps`` / ``support_rest`` (constants; 1 ≤ K < V).
        ref_max_temperature: T' of ``ref_max_logp`` (there the reference's logits are divided by T', not T).

    Returns:
        dict name → float32 tensor (B, T), or (B, T, K) for ``topk_ids`` (long), ``topk_logps`` and
        ``support_logps``; zero at ignored positions. Gradients flow to ``hidden``, ``weight`` and ``bias`` exactly
        as through the plain computation.
    """
    support_k = None if support_ids is None else support_ids.shape[-1]
    stats = _check_stats(stats, ref_hidden is not None, top_k, support_k, weight.shape[0])
    opts = _Options(risk_confidence, top_k, temperature / ref_max_temperature)
    mask = labels != IGNORE_INDEX
    flat = mask.reshape(-1).nonzero().squeeze(-1)  # (N,)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H).index_select(0, flat)
    y = labels.reshape(-1).index_select(0, flat)
    sid = None if support_ids is None else support_ids.reshape(-1, support_k).index_select(0, flat).long()
    rh = None
    if ref_hidden is not None:
        rh = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1]).index_select(0, flat)
        ref_weight, ref_bias = ref_weight.detach(), None if ref_bias is None else ref_bias.detach()

    n = h.shape[0]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    if n == 0:
        values = [_empty(name, h, top_k or support_k) for name in stats]
    elif needs_grad and not set(stats) <= _NO_GRAD:
        values = _ChunkedHeadStats.apply(h, y, weight, bias, rh, ref_weight, ref_bias, sid, stats, chunk_size,
                                         temperature, opts)
    else:
        with torch.no_grad():
            pieces = [_chunk_stats(h[sl], y[sl], _rows(rh, sl), _rows(sid, sl), weight, bias, ref_weight, ref_bias,
                                   stats, temperature, opts) for sl in _chunks(n, chunk_size)]
        values = [torch.cat([p[k] for p in pieces]) for k in range(len(stats))]

    out = {}
    for k, name in enumerate(stats):
        v = values[k]
        full = v.new_zeros((labels.numel(), *v.shape[1:])).index_put((flat,), v)
        out[name] = full.view(*labels.shape, *v.shape[1:])
    return out


def _empty(name: str, like: Tensor, k: int | None) -> Tensor:
    """A statistic over zero positions: (0,) or (0, K), of the statistic's dtype."""
    if name in ("topk_ids", "topk_logps", "support_logps"):
        return like.new_zeros((0, k), dtype=torch.long if name == "topk_ids" else torch.float32)
    return like.new_zeros(0, dtype=torch.float32)


def token_stats_plain(
    logits: Tensor,
    labels: Tensor,
    *,
    ref_logits: Tensor | None = None,
    stats: Sequence[str] = ("logps",),
    temperature: float = 1.0,
    risk_confidence: float = 0.95,
    top_k: int = 0,
    support_ids: Tensor | None = None,
    ref_max_temperature: float = 1.0,
) -> dict[str, Tensor]:
    """The naive twin of ``token_stats``: statistics from full (B, T, V) logits, then masked. For tests and
    for callers that already hold logits."""
    B, T, V = logits.shape
    support_k = None if support_ids is None else support_ids.shape[-1]
    stats = _check_stats(stats, ref_logits is not None, top_k, support_k, V)
    opts = _Options(risk_confidence, top_k, temperature / ref_max_temperature)
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0).reshape(-1)
    logits = logits / temperature if temperature != 1.0 else logits
    if ref_logits is not None:
        ref_logits = ref_logits.detach().reshape(B * T, V)
        ref_logits = ref_logits / temperature if temperature != 1.0 else ref_logits
    sid = None if support_ids is None else support_ids.reshape(B * T, support_k).long()
    values = _stats_from_logits(logits.reshape(B * T, V), safe_labels, ref_logits, stats, opts, sid)
    out = {}
    for name, v in zip(stats, values):
        v = v.view(B, T, *v.shape[1:])
        keep = mask.view(B, T, *([1] * (v.dim() - 2)))
        out[name] = v * keep if v.dtype == torch.long else torch.where(keep, v, torch.zeros((), dtype=v.dtype))
    return out



# --------------------------------------------------------------------------------------------------------------
# Glue to Hugging Face causal LMs (plain, or wrapped by peft).
# --------------------------------------------------------------------------------------------------------------


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head(model) -> tuple[Tensor, Tensor | None]:
    """(weight (V, H), bias (V,) or None) of a causal LM's output projection."""
    head = _unwrap(model).get_output_embeddings()
    if getattr(_unwrap(model).config, "final_logit_softcapping", None):
        raise NotImplementedError("tether's chunked log-probs do not implement final-logit soft-capping (Gemma-2)")
    return head.weight, getattr(head, "bias", None)


def hidden_states(model, input_ids: Tensor, attention_mask: Tensor, *, embedding_grad_in_place: bool = False) -> Tensor:
    """(B, T, H) final hidden states (after the final norm) from the model's backbone, without the LM head.

    ``embedding_grad_in_place``: for ``.backward()`` callers (the recipes) — the input-embedding lookup's gradient
    is added straight into ``embedding.weight.grad`` (``index_add_`` of the (B, T, H) gradient) instead of through
    autograd, which would first build a dense (V, H) gradient (113 MB for SmolLM2 in fp32) and add it to the tied LM
    head's. Same gradient (``tests/test_logprobs.py``), less peak memory. Not for ``torch.autograd.grad``: that
    contribution lands in ``.grad``, not in the returned gradients. Off in a distributed run
    (``tether.distributed.wrapped_training``): DDP's and FSDP2's gradient reduction never see a write into ``.grad``.
    Applies to a plain ``nn.Embedding`` whose weight is trained (without ``max_norm`` / ``scale_grad_by_freq`` /
    ``sparse``); anything else takes the ordinary path.
    """
    backbone = _unwrap(model).get_decoder()
    return backbone(attention_mask=attention_mask, use_cache=False,
                    **backbone_inputs(backbone, input_ids, embedding_grad_in_place)).last_hidden_state


def backbone_inputs(backbone, input_ids: Tensor, embedding_grad_in_place: bool) -> dict[str, Tensor]:
    """The token input of a backbone call: ``{"input_ids": ...}``, or — with ``embedding_grad_in_place`` where it
    applies (see :func:`hidden_states`) — ``{"inputs_embeds": ...}`` whose gradient goes straight into the
    embedding's ``.grad``."""
    emb = backbone.get_input_embeddings()
    if not (embedding_grad_in_place and not wrapped_training() and torch.is_grad_enabled()
            and type(emb) is torch.nn.Embedding
            and emb.weight.requires_grad and emb.max_norm is None and not emb.scale_grad_by_freq and not emb.sparse):
        return {"input_ids": input_ids}
    embeds = F.embedding(input_ids, emb.weight.detach()).requires_grad_()
    embeds.register_hook(functools.partial(_add_embedding_grad, emb.weight, input_ids, emb.padding_idx))
    return {"inputs_embeds": embeds}


def _add_embedding_grad(weight: Tensor, input_ids: Tensor, padding_idx: int | None, grad: Tensor) -> None:
    """d loss / d weight[v] += Σ over positions holding token v of d loss / d embedding (the padding row gets none,
    as ``nn.Embedding`` does)."""
    ids, g = input_ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
    if padding_idx is not None:
        keep = ids != padding_idx
        ids, g = ids[keep], g[keep]
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    weight.grad.index_add_(0, ids, g.to(weight.grad.dtype))


def sequence_sums(per_token: Tensor, labels: Tensor) -> Tensor:
    """Σ_t over label positions of a (B, T) statistic (already zero where masked) → (B,)."""
    return (per_token * (labels != IGNORE_INDEX)).sum(-1)
