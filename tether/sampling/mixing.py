"""Teacher-mixed sampling: draw each token from ``p̃ = α·p + (1 − α)·q``, a mixture of a second model (the teacher
``p``) and the sampled model (the student ``q``), as a stateful logits processor of ``tether.sampling.sample``.

MiniLLM (Gu, Dong, Wei, Huang 2024, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024,
arXiv:2306.08543, §2.2, Eq. 4) samples its policy-gradient rollouts from this mixture at every step, so that the
student's early, poor samples do not dominate the estimate of the sequence-level reverse KL; the importance weights
that correct for it are ``tether.losses.distill.minillm_importance_weights``.

How it runs: :class:`TeacherMixture` keeps the teacher's own incremental key/value cache in step with the tokens the
sampler draws. ``start(rows)`` prefills the teacher on each row's prompt; ``accept(tokens, rows)`` records the drawn
tokens; the next ``__call__(scores, rows)`` drops the rows that have left the batch, runs the teacher one token
forward on the recorded tokens, and returns the mixture's log-probabilities::

    log p̃(v) = logaddexp( log α + log_softmax(z_p / T)[v],  log(1 − α) + log_softmax(s)[v] )

where ``s`` are the scores the sampler passes in (the student's logits over the temperature T, after the processors
before this one) and ``z_p`` the teacher's logits. A token an earlier processor banned (``−inf`` in ``s``) is banned
for the teacher too (its logits are masked the same way before the softmax), so the mixture never revives it.

The processor only shapes the draw (``changes_logprobs = False``): the sampler keeps recording the STUDENT's own
log-probs ``log q(y_t|s_t)``, which is what MiniLLM's rewards and PPO ratios need.

Departures from the official code (microsoft/LMOps ``minillm/``, which patches ``transformers.generate`` in the
authors' fork t1101675/transformers, branch ``minillm``, ``generation/utils.py``: ``mix_in_model``/``mix_in_alpha``):

1. The official sampler runs the whole logits-processor chain (temperature, top-k, top-p) on each model's logits and
   mixes the two truncated softmaxes; here the processors placed BEFORE this one see only the student's scores (their
   ``−inf`` mask is copied onto the teacher) and top-k / top-p (always last in tether's chain) truncate the mixture.
   The two agree at top-k 0 / top-p 1, which is what every MiniLLM script uses.
2. Greedy decoding (temperature 0) takes the arg-max of the mixture, as the official code does; the softmaxes are
   then at temperature 1.

The teacher's incremental decode is a :class:`~tether.sampling.streams.KVStream` (shared with guidance and
steering). Its plain twin is a full forward pass over prompt + tokens so far (the test compares the two at every
step, with rows leaving the batch). Teachers that :func:`tether.sampling.decode.supports` run their one-token steps
through :class:`~tether.sampling.decode.LlamaDecoder` when ``max_new_tokens`` is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tether.sampling.streams import KVStream

__all__ = ["TeacherMixture", "mixture_logprobs"]


def mixture_logprobs(student_scores: torch.Tensor, teacher_scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """``log(α·softmax(teacher_scores) + (1 − α)·softmax(student_scores))`` per row, with the student's ``−inf``
    entries kept ``−inf``.

    Shape: (R, V) each (already divided by the temperature); output (R, V) float32/float64 as the inputs. α = 0 is
    the student's log-softmax, α = 1 the teacher's restricted to the student's allowed tokens.

    Example: student scores log [0.2, 0.8], teacher log [0.8, 0.2], α = 0.2 → p̃ = [0.32, 0.68].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mixture_logprobs: alpha is the teacher's share in [0, 1], got {alpha}")
    banned = torch.isneginf(student_scores)
    log_q = F.log_softmax(student_scores, dim=-1)
    log_p = F.log_softmax(teacher_scores.to(student_scores.dtype).masked_fill(banned, float("-inf")), dim=-1)
    if alpha == 0.0:
        return log_q
    if alpha == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))


class TeacherMixture:
    """A stateful logits processor that turns the sampler's draw into one from ``α·p_teacher + (1 − α)·q``.

    Args:
        teacher: a causal LM sharing the sampled model's vocabulary (its logits are read over the same ids).
        prompt_ids: the prompts passed to ``sample`` (the same list, same order): completion ``r`` answers prompt
            ``r // n``.
        n: completions per prompt, as passed to ``sample``.
        alpha: the teacher's share α ∈ [0, 1] (MiniLLM's ``--teacher-mixed-alpha``, 0.2 in its scripts).
        temperature: the sampler's temperature (the teacher's logits are divided by it; 0 → 1).
        max_new_tokens: ``sample``'s limit; with it, a teacher that ``tether.sampling.decode.supports`` steps through
            ``LlamaDecoder`` (None: always the teacher's own forward).

    Use: ``sample(student, tok, prompts, n=n, temperature=T, processors=[TeacherMixture(teacher, prompts, n=n,
    alpha=0.2, temperature=T)])``. The recorded log-probs stay the student's. One object per ``sample`` call (its
    state is the current batch; ``start`` resets it).
    """

    changes_logprobs = False

    def __init__(self, teacher, prompt_ids: Sequence[Sequence[int]], *, n: int = 1, alpha: float,
                 temperature: float = 1.0, max_new_tokens: int | None = None):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"TeacherMixture: alpha is the teacher's share in [0, 1], got {alpha}")
        self.teacher, self.prompt_ids, self.n, self.alpha = teacher, [list(p) for p in prompt_ids], n, alpha
        self.temperature = temperature if temperature > 0 else 1.0
        self.max_new_tokens = max_new_tokens
        self.stream = KVStream(teacher, lambda r: self.prompt_ids[r // self.n], max_new_tokens=max_new_tokens)

    @property
    def steps(self) -> int:
        """Teacher forward passes run so far (prefill + one-token steps): a test counts them."""
        return self.stream.forwards

    def start(self, rows: torch.Tensor) -> None:
        """Prefill the teacher on the prompt of every completion in ``rows`` (left-padded, like the sampler)."""
        self.stream.start(rows)

    def accept(self, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        """Record the drawn tokens; the teacher steps on them lazily, once the finished rows have left."""
        self.stream.accept(tokens, rows)
        return None

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(R, V) scores → (R, V) ``log p̃`` of the live ``rows``."""
        logits = self.stream.logits(rows)
        if logits.shape[-1] != scores.shape[-1]:
            raise ValueError(f"TeacherMixture: the teacher has {logits.shape[-1]} logits per token, the sampled "
                             f"model {scores.shape[-1]}; mixing needs one shared vocabulary")
        return mixture_logprobs(scores, logits.to(scores.device) / self.temperature, self.alpha).to(scores.dtype)
