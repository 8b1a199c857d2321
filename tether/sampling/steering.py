"""Activation steering with a KL budget: a vector added to one layer's residual stream, its strength calibrated so
that the exact token-level KL to the unsteered model stays within a budget.

Azizi, Baghaei Potraghloo, Pedram 2025, "Activation Steering for Chain-of-Thought Compression" (ASC,
arXiv:2507.04742): a steering vector ``v`` — the mean over paired examples of the difference between the hidden state
of a concise and of a verbose chain of thought at one layer, last token (§3) — is added to that layer's output at
inference, ``h ← h + γ·v``, with the strength γ bounded so that the shift of the next-token distribution stays
within a KL budget. Here:

* :func:`steer` — a context manager that registers a forward hook on decoder block ``layer`` adding ``γ·v`` to its
  output (the residual stream after the block, every position of every forward) and removes it on exit, also on an
  exception. γ = 0 leaves the output tensor untouched (the logits are bit-identical).
* :func:`mean_difference_vector` — ASC's extraction: ``v = mean_j (h_L(a_j) − h_L(b_j))`` at the last token, read at
  the output of the *same* block the hook sits on (the released code reads ``hidden_states[L]``, the block before
  the hooked one, and subtracts where it extracted a difference to add: here extraction and injection use one
  index and one sign).
* :func:`steering_kl` — the exact token-level KL(p_γ ‖ p_0) of the steered to the unsteered next-token law, averaged
  over every position of calibration sequences (float64 over the full vocabulary).
* :func:`calibrate_gamma` — the largest γ ≥ 0 whose measured :func:`steering_kl` is within the budget: doubling
  until the budget is crossed, then bisection; every evaluated (γ, KL) is returned with a monotonicity check.
* :class:`Steer` — steering as a logits processor of ``tether.sampling.sample``: the steered model runs in a second
  KV cache (:class:`~tether.sampling.streams.KVStream`), the sampler's own model stays unsteered, so
  ``Completions.kl_cost`` is the summed exact KL(steered ‖ unsteered) along each completion.

Departures from ASC: (1) γ is set by measuring the exact KL on calibration sequences and bisecting, not by the
paper's closed-form second-order bound (whose formula we could not check; for small γ the measured KL grows as γ²,
which the tests check); (2) the vector is added at every position of every forward (ActAdd-style), where the
released code changes only the last position of each forward (so the prompt's cached states stay unsteered) — with
every position steered, a cached decode and a full forward over the same tokens agree, which is what makes the
KL accounting exact; (3) the sign is explicit: ``+γ·v``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tether.kl import reverse_kl
from tether.sampling.streams import KVStream

__all__ = ["Calibration", "Steer", "calibrate_gamma", "decoder_layers", "mean_difference_vector", "steer",
           "steering_kl"]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (``model.model.layers``, through a PEFT wrapper too)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"steering: {type(model).__name__} has no decoder blocks at model.model.layers")
    return layers


def _check_layer(model, layer: int) -> torch.nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"steering: layer {layer} out of range; the model has decoder blocks 0..{len(layers) - 1}")
    return layers[layer]


@contextlib.contextmanager
def steer(model, layer: int, vector: torch.Tensor, gamma: float) -> Iterator[None]:
    """Within the block, decoder block ``layer`` outputs ``h + γ·v`` instead of ``h`` (every position).

    ``vector``: (hidden,) any float dtype (cast to the block's output). γ = 0 registers a hook that returns the
    output unchanged. The hook is removed on exit. Forward hooks make ``tether.sampling.decode.supports`` refuse the
    model, so ``sample`` inside the block runs the model's own forward (which runs the hook).
    """
    block = _check_layer(model, layer)
    if vector.dim() != 1:
        raise ValueError(f"steer: the steering vector must be 1-D (hidden,), got shape {tuple(vector.shape)}")
    if not math.isfinite(gamma):
        raise ValueError(f"steer: gamma must be finite, got {gamma}")

    def hook(module, args, output):
        if gamma == 0.0:
            return output
        h = output[0] if isinstance(output, tuple) else output
        h = h + gamma * vector.to(dtype=h.dtype, device=h.device)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _padded(seqs: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def mean_difference_vector(model, layer: int, positive: Sequence[Sequence[int]],
                           negative: Sequence[Sequence[int]]) -> torch.Tensor:
    """ASC's steering vector: ``mean_j (h(positive_j) − h(negative_j))``, h the output of block ``layer`` at each
    sequence's last token. Shape: (hidden,) float32. ``positive``/``negative``: paired token-id sequences."""
    block = _check_layer(model, layer)
    if len(positive) != len(negative) or not positive:
        raise ValueError(f"mean_difference_vector: need as many positive as negative sequences (≥ 1), got "
                         f"{len(positive)} and {len(negative)}")
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).float())

    device = next(model.parameters()).device
    states = []
    for seqs in (positive, negative):
        ids, mask = _padded(seqs, device)
        captured.clear()
        handle = block.register_forward_hook(keep)
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            handle.remove()
        last = mask.sum(-1) - 1
        states.append(captured[0][torch.arange(len(seqs), device=device), last])
    return (states[0] - states[1]).mean(0).cpu()


@torch.no_grad()
def _logps(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double(), dim=-1)


@torch.no_grad()
def steering_kl(model, sequences: Sequence[Sequence[int]], layer: int, vector: torch.Tensor, gamma: float, *,
                reference: torch.Tensor | None = None) -> float:
    """Mean over every position of ``sequences`` of the exact KL(p_γ ‖ p_0) between the steered and the unsteered
    next-token laws (float64, full vocabulary). ``reference``: the unsteered (B, T, V) log-probs, when already
    computed (``calibrate_gamma`` reuses them)."""
    device = next(model.parameters()).device
    ids, mask = _padded(sequences, device)
    ref = _logps(model, ids, mask) if reference is None else reference
    with steer(model, layer, vector, gamma):
        steered = _logps(model, ids, mask)
    kl = reverse_kl(steered, ref)
    return float(kl[mask.bool()].mean())


@dataclass
class Calibration:
    """The result of :func:`calibrate_gamma`."""

    gamma: float
    """The largest evaluated γ whose measured KL is within the budget."""
    kl: float
    """Its measured mean token KL(p_γ ‖ p_0), nats (≤ budget)."""
    budget: float
    evaluations: list[tuple[float, float]] = field(default_factory=list)
    """Every (γ, KL) evaluated, in increasing γ."""
    monotone: bool = True
    """Whether the evaluated KLs increase with γ (bisection assumes it; when False, γ still meets the budget but a
    larger γ that also meets it may have been missed)."""


def calibrate_gamma(model, sequences: Sequence[Sequence[int]], layer: int, vector: torch.Tensor, budget: float, *,
                    gamma_start: float = 1.0, rel_tol: float = 1e-3, max_evaluations: int = 60) -> Calibration:
    """The largest γ ≥ 0 with ``steering_kl(γ) ≤ budget`` (mean token KL, nats, on ``sequences``).

    Doubling from ``gamma_start`` until the KL exceeds the budget, then bisection of the bracket [lo, hi] until
    ``hi − lo ≤ rel_tol · hi``; returns lo (measured within the budget). Each evaluation is one steered forward over
    the sequences (the unsteered log-probs are computed once). A ``ValueError`` when no γ up to the last doubling
    crosses the budget (the vector does not move the law enough) or the budget is not positive.
    """
    if not budget > 0:
        raise ValueError(f"calibrate_gamma: the KL budget must be > 0 nats, got {budget}")
    if not gamma_start > 0:
        raise ValueError(f"calibrate_gamma: gamma_start must be > 0, got {gamma_start}")
    device = next(model.parameters()).device
    ids, mask = _padded(sequences, device)
    ref = _logps(model, ids, mask)
    evals: dict[float, float] = {0.0: 0.0}

    def kl_at(g: float) -> float:
        evals[g] = steering_kl(model, sequences, layer, vector, g, reference=ref)
        return evals[g]

    lo, hi = 0.0, gamma_start
    while kl_at(hi) <= budget:
        lo, hi = hi, 2 * hi
        if len(evals) >= max_evaluations:
            raise ValueError(f"calibrate_gamma: KL at γ = {lo:g} is {evals[lo]:.3g} nats, still within the budget "
                             f"{budget:g}; the vector barely moves the law at layer {layer}: pass a larger "
                             "gamma_start or a smaller budget")
    while hi - lo > rel_tol * hi and len(evals) < max_evaluations:
        mid = (lo + hi) / 2
        if kl_at(mid) <= budget:
            lo = mid
        else:
            hi = mid
    points = sorted(evals.items())
    monotone = all(b[1] >= a[1] for a, b in zip(points, points[1:]))
    return Calibration(gamma=lo, kl=evals[lo], budget=budget, evaluations=points, monotone=monotone)


class Steer:
    """Activation steering as a logits processor: the draw (and, by default, the recorded log-probs) follow the
    steered model, and ``Completions.kl_cost`` measures the steering's exact KL to the unsteered sampled model.

    Args:
        model: the sampled model (``sample`` runs it unsteered; this processor runs it steered in its own cache).
        prompt_ids: the prompts given to ``sample``, same order; n: completions per prompt.
        layer, vector, gamma: as in :func:`steer` (γ from :func:`calibrate_gamma`).
        temperature: the sampler's temperature (the steered logits are divided by it; 0 → 1).
        changes_logprobs: ``True`` (default): the recorded log-probs are the steered law's.

    Tokens an earlier processor banned stay banned. Costs a second forward per step (the model's own forward with
    the hook, not the lean decode path). One object per ``sample`` call.
    """

    def __init__(self, model, prompt_ids: Sequence[Sequence[int]], *, n: int = 1, layer: int, vector: torch.Tensor,
                 gamma: float, temperature: float = 1.0, changes_logprobs: bool = True):
        _check_layer(model, layer)
        prompts = [list(p) for p in prompt_ids]
        self.stream = KVStream(model, lambda r: prompts[r // n],
                               context=lambda: steer(model, layer, vector, gamma))
        self.temperature = temperature if temperature > 0 else 1.0
        self.changes_logprobs = changes_logprobs

    def start(self, rows: torch.Tensor) -> None:
        self.stream.start(rows)

    def accept(self, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        self.stream.accept(tokens, rows)

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        steered = self.stream.logits(rows).to(scores.device, scores.dtype) / self.temperature
        return steered.masked_fill(torch.isneginf(scores), float("-inf"))
