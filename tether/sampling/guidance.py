"""KL-guided temperature: sample greedily where the grounding source changes the next token, freely where not.

Chang, Reitter, Aksitov, Sung 2023, "KL-Divergence Guided Temperature Sampling" (arXiv:2306.01286), §3: run two
decodes of one model in lock-step along the same generated prefix — one whose prompt contains the source (the
evidence a grounded answer must follow), one with the source removed — and at each step t set

    KL_t = KL(p_with ‖ p_without) = Σ_v p_with(v) · (log p_with(v) − log p_without(v)),
           p_with = softmax(z_t), p_without = softmax(z'_t)   (logits at temperature 1),
    T_t  = T₀ · 2^(−KL_t / h),

then draw y_t from softmax(z_t / T_t) and append it to both decodes. The KL direction is with ‖ without (the
source-conditioned law first), as in the authors' released code (google-research ``kl_guided_sampling``,
``decoding.py``); h (the "KL bandwidth") is a half-life: KL_t = h halves the temperature, KL_t = 0 keeps T₀.

Departures from the released code:

1. the KL is computed exactly from log-softmaxes (the code clips both probability vectors at 1e-7 before the logs
   and clamps the KL at 0; the exact KL is ≥ 0 by itself);
2. top-k / top-p are tether's sampler's own (its public entry point defaults to top-k = 1, i.e. greedy);
3. T_t has a floor ``min_temperature`` (the code's floor plays the same role: no division by ~0);
4. the two prompts are given explicitly (the code marks the source by negative token ids in one input).

How it runs: :class:`KLGuidedTemperature` is a stateful logits processor of ``tether.sampling.sample``. The sampler
is given the prompts *with* the source; the processor holds a :class:`~tether.sampling.streams.KVStream` of the same
model on the prompts *without* it (a second KV cache stepped with the drawn tokens) and returns ``z / T_t``.
With ``changes_logprobs=True`` (default) the sampler records log softmax(z / T_t)(y_t), the law the token was drawn
from, and ``Completions.kl_cost`` is Σ_t KL(softmax(z/T_t) ‖ softmax(z/T₀)): what the temperature change cost
against plain sampling at T₀ (not the with ‖ without KL that steers it — that one is kept in ``guide_kl``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tether.kl import reverse_kl
from tether.sampling.streams import KVStream

__all__ = ["KLGuidedTemperature", "kl_guided_temperature"]


def kl_guided_temperature(z_with: torch.Tensor, z_without: torch.Tensor, temperature: float, bandwidth: float,
                          min_temperature: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row temperature ``T = max(T₀ · 2^(−KL/h), T_min)`` and the KL that set it.

    ``KL = KL(softmax(z_with) ‖ softmax(z_without))`` exactly, Eq. of §3 of Chang et al. 2023 (see the module
    docstring). Shape: logits (R, V) each → (T (R,), KL (R,)), float64. ``−inf`` entries of ``z_with`` (tokens an
    earlier processor banned) contribute nothing.

    Example: identical logits → KL = 0, T = T₀; KL = h → T = T₀ / 2; KL = 3h → T = T₀ / 8.
    """
    if not temperature > 0 or not bandwidth > 0 or min_temperature < 0:
        raise ValueError(f"kl_guided_temperature: need temperature > 0, bandwidth > 0, min_temperature ≥ 0; got "
                         f"{temperature}, {bandwidth}, {min_temperature}")
    kl = reverse_kl(z_with.double(), z_without.to(z_with.device).double())
    return (temperature * torch.exp2(-kl / bandwidth)).clamp(min=min_temperature), kl


class KLGuidedTemperature:
    """Stateful processor: each step's temperature set by the KL between the with-source and without-source laws.

    Args:
        model: the sampled model (the second stream runs the same weights on ``source_free_prompts``).
        source_free_prompts: token ids of each prompt with the source removed, same order as the ``prompt_ids``
            given to ``sample`` (completion r answers prompt ``r // n``).
        n: completions per prompt, as passed to ``sample``.
        temperature: T₀, the sampler's temperature (must equal it: the processor gets the scores ``z / T₀``).
        bandwidth: h > 0, the KL (nats) that halves the temperature (1.0 in the authors' public entry point).
        min_temperature: the floor of T_t (default 1e-3).
        max_new_tokens: the sampler's limit; with it, a supported model steps through ``LlamaDecoder``.
        changes_logprobs: ``True`` (default): record the log-probs of the law drawn from, softmax(z / T_t).

    ``temperatures`` and ``guide_kl`` keep, per completion row, every step's T_t and KL_t (a report; a test reads
    them). One object per ``sample`` call.
    """

    def __init__(self, model, source_free_prompts: Sequence[Sequence[int]], *, n: int = 1, temperature: float,
                 bandwidth: float = 1.0, min_temperature: float = 1e-3, max_new_tokens: int | None = None,
                 changes_logprobs: bool = True):
        if not temperature > 0:
            raise ValueError(f"KLGuidedTemperature: temperature must be > 0 (T₀ of the sampler), got {temperature}; "
                             "at temperature 0 the draw is the arg-max whatever T_t is")
        if not bandwidth > 0 or not math.isfinite(bandwidth):
            raise ValueError(f"KLGuidedTemperature: bandwidth h must be finite and > 0, got {bandwidth} (for plain "
                             "temperature sampling, leave the processor out)")
        prompts = [list(p) for p in source_free_prompts]
        self.stream = KVStream(model, lambda r: prompts[r // n], max_new_tokens=max_new_tokens)
        self.temperature, self.bandwidth, self.min_temperature = temperature, bandwidth, min_temperature
        self.changes_logprobs = changes_logprobs
        self.temperatures: dict[int, list[float]] = {}
        self.guide_kl: dict[int, list[float]] = {}

    def start(self, rows: torch.Tensor) -> None:
        self.stream.start(rows)
        for r in rows.tolist():
            self.temperatures[r], self.guide_kl[r] = [], []

    def accept(self, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        self.stream.accept(tokens, rows)

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        z = scores * self.temperature
        t, kl = kl_guided_temperature(z, self.stream.logits(rows), self.temperature, self.bandwidth,
                                      self.min_temperature)
        for r, ti, ki in zip(rows.tolist(), t.tolist(), kl.tolist()):
            self.temperatures[r].append(ti)
            self.guide_kl[r].append(ki)
        if bool((t == self.temperature).all()):  # the laws coincide: plain sampling at T₀, scores as they came
            return scores
        return (z.double() / t[:, None].to(z.device)).to(scores.dtype)
