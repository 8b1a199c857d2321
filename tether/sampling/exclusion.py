"""Token exclusion: banned tokens and banned phrases removed from each step's law, the rest renormalised.

Lee 2025, "(G)I-DLE: Generative Inference via Distribution-preserving Logit Exclusion with KL Divergence
Minimization for Constrained Decoding" (arXiv:2503.18050) states exclusion as a projection: at step t, with the
model's law ``P = P(· | y_<t)`` and a banned set ``B_t``,

    Q* = argmin_{Q : Q(B_t) = 0} KL(Q ‖ P),     Q*(v) = P(v) / P(B_t^c)  for v ∉ B_t,  0 on B_t,

(the renormalised restriction; for Q supported on B^c, KL(Q ‖ P) = KL(Q ‖ Q*) − log P(B^c), so Q* is the unique
minimiser and the least KL an exclusion can cost is ``−log P(B_t^c)`` per step).

Relation to −∞ masking
----------------------
At one softmax step the two are the same law: ``softmax(z with z_B = −∞) = Q*`` exactly
(:func:`renormalize_excluding` is the formula, :func:`masked_softmax_plain` the masking, and the tests compare them
on random logits and by enumeration of whole sequences on a table model). What can make a pipeline's "masking"
differ from Q* — and what tether therefore does not do — is bookkeeping around it: truncating (top-k / top-p) on the
unmasked law and masking afterwards (tether's chain runs exclusion first, on the temperature-scaled scores, and
top-k / top-p after it, on the excluded law; masking commutes with temperature, −∞ / T = −∞), zeroing probabilities
without renormalising, a finite "large negative" constant in low precision, or recording log-probs under the
unmasked normaliser. Here the processor declares ``changes_logprobs = True``, so the log-prob the sampler records for
a token is ``log Q*(y_t)`` — that of the law it was drawn from — and ``Completions.kl_cost`` adds up
``−log P_t(B_t^c)`` along each completion. The paper reports lower output variance than masking for Qwen2.5 models;
we found no public code, and at the level of one step's law there is nothing to differ, so tether implements Q* and
claims no more than its equality with masking.

Neither exclusion nor masking samples the sequence-level conditional ``P(y | y avoids B)``: renormalising locally
favours prefixes that lose little mass early (the same gap as a grammar mask; ``tether.sampling.constraints``).

Phrases
-------
A banned phrase is a token-id sequence ``(a_1, …, a_k)``: at a step where the completion so far ends with
``a_1 … a_{k−1}``, the token ``a_k`` is banned (a single-token phrase bans its token at every step). So no
completion contains the phrase as that token sequence. Only the completion's own tokens count (a phrase that would
start in the prompt is not tracked), and a phrase is banned in the tokenization given: the same text spelled by
other tokens passes (``Exclude.from_strings`` bans the tokenizer's own encoding of each string, with and without a
leading space).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["Exclude", "masked_softmax_plain", "renormalize_excluding"]


def renormalize_excluding(scores: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """log Q*: the law softmax(scores) restricted to the allowed tokens and renormalised, in log space.

    ``log Q*(v) = log_softmax(scores)(v) − log P(B^c)`` for v ∉ B, ``−inf`` on B, where
    ``log P(B^c) = logsumexp_{v ∉ B} log_softmax(scores)(v)``.

    Shape: ``scores`` (..., V) float, ``banned`` (..., V) bool (broadcastable); output (..., V), same dtype.
    A row whose every token is banned (or already ``−inf``) has no law: it comes back all NaN; the sampler
    refuses such a row with a message naming it.

    Example: P = (0.5, 0.3, 0.2), B = {0} → Q* = (0, 0.6, 0.4), KL(Q* ‖ P) = −log 0.5 = 0.693.
    """
    logp = F.log_softmax(scores, dim=-1).masked_fill(banned, float("-inf"))
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


def masked_softmax_plain(scores: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """The plain −∞-masking twin of :func:`renormalize_excluding`: ``log_softmax(scores with −inf on B)``."""
    return F.log_softmax(scores.masked_fill(banned, float("-inf")), dim=-1)


class Exclude:
    """A logits processor that bans tokens and token phrases (see the module docstring), per row.

    Args:
        tokens: token ids never to draw.
        phrases: token-id sequences never to complete; a one-token phrase is the same as listing its token.
        changes_logprobs: ``True`` (default): the recorded log-probs are those of the excluded, renormalised law the
            token was drawn from. ``False`` keeps recording the model's own log-probs (for importance ratios
            against the unexcluded policy); the draw is the same.

    Stateful (``start``/``accept``: each row's generated tokens, for the phrases); a processor object can be reused
    across ``sample`` calls. What the exclusion did, never silent: ``removed`` counts the (row, step) pairs where a
    banned token had positive probability, ``removed_mass`` adds up that probability P_t(B_t) over them (the mass
    the model put on banned continuations; its per-step cost is −log(1 − P_t(B_t))).

    Use: ``sample(model, tok, prompts, processors=[Exclude(tokens=[13], phrases=[[450, 1204]])])``.
    """

    def __init__(self, tokens: Sequence[int] = (), phrases: Sequence[Sequence[int]] = (), *,
                 changes_logprobs: bool = True):
        phrases = [tuple(int(t) for t in p) for p in phrases]
        if any(len(p) == 0 for p in phrases):
            raise ValueError("Exclude: an empty phrase bans nothing; drop it (phrases are token-id sequences)")
        self.tokens = sorted({int(t) for t in tokens} | {p[0] for p in phrases if len(p) == 1})
        if any(t < 0 for t in self.tokens):
            raise ValueError(f"Exclude: token ids are ≥ 0, got {[t for t in self.tokens if t < 0]}")
        # prefix (a_1 … a_{k−1}) → the last tokens it bans
        self.follow: dict[tuple[int, ...], set[int]] = {}
        for p in phrases:
            if len(p) > 1:
                self.follow.setdefault(p[:-1], set()).add(p[-1])
        self.longest = max((len(k) for k in self.follow), default=0)
        self.changes_logprobs = changes_logprobs
        self.history: dict[int, list[int]] = {}
        self.removed = 0
        self.removed_mass = 0.0

    @classmethod
    def from_strings(cls, tokenizer, tokens: Sequence[str] = (), phrases: Sequence[str] = (),
                     **kwargs) -> Exclude:
        """Ban strings as the tokenizer encodes them: each of ``tokens`` must be one token (else a ``ValueError``
        naming it); each of ``phrases`` is banned as its encoding and as the encoding of " " + phrase."""
        ids = []
        for s in tokens:
            enc = tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ValueError(f"Exclude.from_strings: {s!r} is {len(enc)} tokens ({enc}), not one; pass it "
                                 "as a phrase")
            ids.append(enc[0])
        seqs = {tuple(tokenizer(v, add_special_tokens=False)["input_ids"]) for s in phrases for v in (s, " " + s)}
        return cls(ids, sorted(s for s in seqs if s), **kwargs)

    def start(self, rows: torch.Tensor) -> None:
        for r in rows.tolist():
            self.history[r] = []

    def accept(self, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        for r, t in zip(rows.tolist(), tokens.tolist()):
            self.history.setdefault(r, []).append(t)
        return None

    def banned(self, rows: torch.Tensor, vocab: int) -> torch.Tensor:
        """(R, V) bool: the tokens banned for each live row at this step."""
        ban = torch.zeros(len(rows), vocab, dtype=torch.bool)
        if self.tokens:
            ban[:, [t for t in self.tokens if t < vocab]] = True
        if self.follow:
            for i, r in enumerate(rows.tolist()):
                h = self.history.get(r, [])
                for k in range(1, min(self.longest, len(h)) + 1):
                    for t in self.follow.get(tuple(h[-k:]), ()):
                        if t < vocab:
                            ban[i, t] = True
        return ban

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ban = self.banned(rows, scores.shape[-1]).to(scores.device)
        hit = (ban & torch.isfinite(scores)).any(-1)
        if not hit.any():
            return scores
        self.removed += int(hit.sum())
        self.removed_mass += float(scores.softmax(-1).masked_fill(~ban, 0.0).sum())
        # rows with nothing to remove keep their scores as they are (their KL cost is then exactly 0)
        return torch.where(hit[:, None], renormalize_excluding(scores, ban), scores)
