"""A second decode stream kept in step with the sampler: its own prompts, its own KV cache, the sampler's tokens.

Processors that compare the sampled model's next-token law with another one at every step — KL-guided temperature
(the same model without the grounding source in its prompt, ``tether.sampling.guidance``), activation steering
(the same model with a steering hook, ``tether.sampling.steering``) — need the other law along the *same* generated
prefix. :class:`KVStream` prefills its own prompts once (left-padded, like the sampler), then on each step drops the
rows that have left the sampler's batch and runs one token forward on the tokens the sampler drew.

The plain twin of the incremental stream is a full forward over prompt + tokens so far (the tests compare them as
rows leave). Models that ``tether.sampling.decode.supports`` step through ``LlamaDecoder`` unless a ``context`` is
given (a hook would not see the decoder's own arithmetic).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence

import torch

from tether.sampling.decode import LlamaDecoder, supports

__all__ = ["KVStream"]


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are read in fp32; float64 ones (the exact-enumeration tests) stay float64."""
    return logits if logits.dtype == torch.float64 else logits.float()


class KVStream:
    """Next-token logits of ``model`` on ``prompts[r]`` + the tokens drawn so far, for every live sampler row r.

    Args:
        model: a causal LM (Hugging Face forward with a cache), vocabulary shared with the sampled model.
        prompts: the stream's prompt of each *completion row* r, as a function ``r -> token ids``.
        max_new_tokens: the sampler's limit; with it and no ``context``, a supported model steps through
            ``LlamaDecoder``.
        context: a function returning a context manager entered around every forward of this stream (a steering
            hook); None: no context.

    Protocol (what a processor forwards to it): ``start(rows)`` when a batch starts, ``accept(tokens, rows)`` after
    each step, ``logits(rows)`` to read the (R, V) fp32 logits (float64 for a float64 model) for the live ``rows``
    (a subset, in order, of the last rows seen).
    """

    def __init__(self, model, prompts: Callable[[int], Sequence[int]], *, max_new_tokens: int | None = None,
                 context: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.model, self.prompts, self.max_new_tokens = model, prompts, max_new_tokens
        self.context = context or contextlib.nullcontext
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.forwards = 0
        """Forward passes run so far (prefills + one-token steps)."""

    @torch.no_grad()
    def start(self, rows: torch.Tensor) -> None:
        from transformers import DynamicCache

        prompts = [list(self.prompts(r)) for r in rows.tolist()]
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with self.context():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: cache})
            self._logits = _at_least_fp32(out.logits[:, -1])
        self.forwards += 1
        self.decoder = None
        if self.max_new_tokens is not None and self.context is contextlib.nullcontext and supports(self.model):
            self.decoder = LlamaDecoder(self.model)
            self.decoder.start(cache, mask, self.max_new_tokens)
            cache = None
        self.cache, self.mask, self.next_pos = cache, mask, positions[:, -1] + 1
        self.rows = rows.tolist()
        self.pending: torch.Tensor | None = None

    def accept(self, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        if rows.tolist() != self.rows:
            raise ValueError("KVStream: accept() saw other rows than the last step; one stream per sample() call, "
                             "driven by the sampler")
        self.pending = tokens

    @torch.no_grad()
    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        rows_l = rows.tolist()
        if rows_l != self.rows:
            where = {r: i for i, r in enumerate(self.rows)}
            if any(r not in where for r in rows_l):
                raise ValueError(f"KVStream: rows {rows_l} are not a subset of the live rows {self.rows}")
            idx = torch.tensor([where[r] for r in rows_l], device=self.mask.device)
            if self.decoder is not None:
                self.decoder.keep(idx)
            else:
                self.cache.batch_select_indices(idx)
            self.mask, self.next_pos, self._logits = self.mask[idx], self.next_pos[idx], self._logits[idx]
            if self.pending is not None:
                self.pending = self.pending[idx.to(self.pending.device)]
            self.rows = rows_l
        if self.pending is not None:
            tokens = self.pending.to(self.mask.device)
            if self.decoder is not None:
                self._logits = _at_least_fp32(self.decoder.step(tokens, self.next_pos))
            else:
                self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows_l), 1)], dim=1)
                with self.context():
                    out = self.model(input_ids=tokens[:, None], attention_mask=self.mask,
                                     position_ids=self.next_pos[:, None], use_cache=True,
                                     **{self._cache_kw: self.cache})
                    self._logits = _at_least_fp32(out.logits[:, -1])
            self.forwards += 1
            self.next_pos = self.next_pos + 1
            self.pending = None
        return self._logits
