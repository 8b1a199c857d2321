"""Sampling completions from a causal LM with a KV cache, seeded and batched, with the sampler's log-probs.

Used by the quickstart (building preference pairs), by evaluation (held-out reward, KL measurement) and by the
online recipes (rollouts need the sampler's per-token log-probs for importance ratios).

Two engines sit behind one interface. ``engine="tether"`` (the default) is tether's own loop: each prompt is
prefilled once and its cache copied for its ``n`` completions, finished rows leave the batch, log-probs are
recorded while sampling, and for Llama-architecture models the one-token steps run through ``tether.sampling.decode``
(the model's forward otherwise). On the 2-core CPU, SmolLM2, 2 prompts × 8 samples × ≤ 48 tokens, it generates
1.6× the tokens/s of ``model.generate`` (86.2 vs 54.0, ``bench/grpo_vs_trl.py``, same process, interleaved);
at 16 prompts × 4 samples it measured 2.3× already before ``tether.sampling.decode`` (103–112 vs 45–47 tokens/s).
``engine="hf"`` runs ``model.generate`` and recomputes the log-probs with one teacher-forced pass. Both agree
with ``model.generate`` on greedy output and with teacher forcing on log-probs (``tests/sampling/test_sampler.py``).

A completion ends at the tokenizer's end-of-sequence token (kept in its ids), at a stop string (the token that
completes it is kept), when a logits processor finishes it, or at ``max_new_tokens`` (``finished=False``; callers
count these, nothing is hidden).

Between the logits and the draw, every step runs a chain of logits processors (``tether.sampling.processors``):
the caller's ``processors``, then top-k and top-p. Which of them the recorded log-probs see is declared by each
(``changes_logprobs``); by default the log-probs are the policy's own, softmax(logits / temperature), before any
truncation.

The KL cost of an intervention: when the caller passes ``processors``, the sampler also sums, along each
completion, the exact next-token KL between the distribution after the caller's processors and the model's own
(``Completions.kl_cost``, defined there precisely).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tether.kl import reverse_kl
from tether.sampling.decode import LlamaDecoder, supports
from tether.sampling.processors import LogitsProcessor, TopK, TopP, check_processors, is_stateful
from tether.stats import mean_ci95

__all__ = ["Completions", "kl_cost_summary", "render_prompts", "sample"]


@dataclass
class Completions:
    """``len(prompt_index)`` completions; entry k of each list describes completion k (grouped by prompt)."""

    prompt_index: list[int] = field(default_factory=list)
    """Which prompt (position in the input list) each completion answers."""
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    """Generated ids up to and including the end-of-sequence token / stop token, no padding."""
    logprobs: list[list[float]] = field(default_factory=list)
    """log π(y_t | s_t) of each generated token: log_softmax(C(logits / temperature))[y_t], where C are the logits
    processors that declare ``changes_logprobs`` (constraints; none by default) — so by default the policy's own
    distribution at the sampling temperature, before top-k/top-p truncation (temperature 0 → temperature 1)."""
    texts: list[str] = field(default_factory=list)
    """Decoded completions without special tokens."""
    finished: list[bool] = field(default_factory=list)
    """False when the completion was cut at max_new_tokens (True at end-of-sequence, a stop string, or when a
    logits processor finished it)."""
    kl_cost: torch.Tensor | None = None
    """(N,) float64, the KL cost of the caller's logits processors along each completion, or None when ``sample``
    was given no ``processors`` (nothing to cost) or ran ``engine="hf"`` (which does not record it):

        kl_cost[k] = Σ_t KL(q_t ‖ p_t) = Σ_t Σ_v q_t(v) · (log q_t(v) − log p_t(v))

    over the generated positions t of completion k (its end-of-sequence token included), where, at the sampling
    temperature T (T = 1 at temperature 0),

    * p_t = softmax(logits_t / T): the sampled model's own next-token law, before any processor;
    * q_t = softmax(P(logits_t / T)): the law after the caller's ``processors`` P (all of them, in order: those
      that change the recorded log-probs and those that only shape the draw), before the sampler's own ``top_k`` /
      ``top_p`` (which apply to both laws alike and are not part of the intervention).

    Without top-k / top-p at T > 0, q_t is exactly the law y_t was drawn from, so by the chain rule of KL the
    expected ``kl_cost`` of a completion is the sequence-level KL(Q ‖ P) between the intervened sampler Q and the
    model P at temperature T, both up to ``max_new_tokens``. A processor that changes nothing costs exactly 0; a
    banned set B costs −log P_t(B^c) per step; a processor that replaces the logits by another model's
    (``tether.sampling.steering.Steer``: the steered model) costs that model's KL to the sampled one."""

    def select(self, indices: Sequence[int]) -> Completions:
        """The completions at ``indices`` (in that order), every per-completion field taken along (``kl_cost``
        included when present)."""
        idx = list(indices)
        return Completions(**{f.name: (None if v is None else v[idx] if isinstance(v, torch.Tensor)
                                       else [v[k] for k in idx])
                              for f in dataclasses.fields(self) for v in [getattr(self, f.name)]})


def kl_cost_summary(done: Completions, prefix: str = "intervention_kl") -> dict[str, float]:
    """The KL cost of the sampler's processors over a set of completions, with a 95% CI over prompts: each prompt's
    mean ``kl_cost`` over its completions, then their mean and the CI half-width (``tether.stats.mean_ci95``).

    Returns ``{prefix: mean, prefix + "_ci95": half-width}`` in nats per completion, or ``{}`` when ``done`` has no
    ``kl_cost`` (no processors). Example: prompts with completion costs [0.1, 0.3] and [0.5] → per-prompt means
    0.2, 0.5 → mean 0.35."""
    if done.kl_cost is None:
        return {}
    per: dict[int, list[float]] = {}
    for i, c in zip(done.prompt_index, done.kl_cost.tolist()):
        per.setdefault(i, []).append(c)
    if not per:
        return {}
    mean, half = mean_ci95([sum(v) / len(v) for v in per.values()])
    return {prefix: mean, f"{prefix}_ci95": half}


def render_prompts(tokenizer, prompts: Sequence[str | list[dict]], *,
                   use_chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt: a string becomes one user turn (with the chat template), a message list is
    templated as is; ``add_generation_prompt=True`` so the model answers as the assistant. A prompt holding the
    literal text of one of the tokenizer's special tokens is refused (``tether.data.chat``: it would be read as the
    token itself and could open a turn)."""
    from tether.data.chat import control_token_problem, special_tokens, texts_of

    special = special_tokens(tokenizer)
    out = []
    for i, p in enumerate(prompts):
        if found := control_token_problem(texts_of(p), special):
            raise ValueError(f"prompt {i}{found[0]}: {found[1]}")
        if use_chat_template and tokenizer.chat_template:
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        elif isinstance(p, str):
            text = p
        else:
            raise ValueError("chat-message prompts need a tokenizer with a chat template")
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def _draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of ``probs`` (rows, V) by inverse-CDF sampling: a uniform draw per row located in the
    float64 cumulative sum. Exact for the given probabilities (a token of probability 0 has an empty interval) and,
    unlike ``torch.multinomial``, it draws one random number per row rather than one per vocabulary entry — at a
    vocabulary of 49k that is most of a CPU decode step's sampling time."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=gen, dtype=torch.float64).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_strings: Sequence[str] = (),
           seed: int = 0, batch_size: int = 32, progress: bool = False, desc: str = "sampling",
           engine: str = "tether", processors: Sequence[LogitsProcessor] = (),
           lean_decode: bool | None = None, first_batch: int = 0) -> Completions:
    """``n`` completions for each prompt (``batch_size`` completions generated together; ``temperature=0`` is
    greedy). Deterministic for a given (seed, batch_size): batch b draws from its own RNG stream seeded by (seed, b).
    ``first_batch``: number the batches from there (batch b's stream is (seed, first_batch + b)) — a process that
    samples batches k, k+1, … of a longer prompt list (``tether.online_step`` under torchrun) draws what one process
    sampling the whole list draws for them.

    ``engine="tether"`` runs tether's own loop (prefill once per prompt, finished rows leave the batch, log-probs
    recorded while sampling); ``engine="hf"`` runs ``model.generate`` and recomputes the sampler log-probs with one
    teacher-forced forward pass. Both return the same kind of result.

    ``processors``: logits processors run at every step on the temperature-scaled logits, in order, before top-k
    and top-p (``tether.sampling.processors`` has the contract). Those with ``changes_logprobs=True`` (constraints)
    come first and the recorded log-probs are taken after them; the others only shape the draw. ``top_k``/``top_p``
    become ``TopK``/``TopP`` at the end of the chain (draw-only; not applied at temperature 0). ``engine="hf"``
    accepts only stateless, draw-only processors. With ``processors`` (``engine="tether"``) the result carries each
    completion's summed KL cost of them, ``Completions.kl_cost``.

    ``lean_decode``: run the one-token steps of ``engine="tether"`` through ``tether.sampling.decode`` (True), through
    the model's own forward (False, the plain twin), or the former whenever the model qualifies (None)."""
    if engine not in ("hf", "tether"):
        raise ValueError(f"sample: engine must be 'hf' or 'tether', got {engine!r}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or n < 1 or max_new_tokens < 1:
        raise ValueError(f"sample: need temperature ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0, n ≥ 1, max_new_tokens ≥ 1; got "
                         f"temperature={temperature}, top_p={top_p}, top_k={top_k}, n={n}, "
                         f"max_new_tokens={max_new_tokens}")
    if lean_decode and (engine == "hf" or not supports(model)):
        raise ValueError(f"sample: lean_decode=True needs engine='tether' and a plain LlamaForCausalLM with silu MLP, "
                         f"no biases, default RoPE and no forward hooks (got engine={engine!r}, "
                         f"{type(model).__name__}); pass lean_decode=None to use it where it applies")
    _check_context(model, prompt_ids, max_new_tokens)
    processors = list(processors)
    n_reporting = check_processors(processors)
    if engine == "hf":
        _check_hf_processors(processors)
    chain = processors + ([TopK(top_k)] if temperature > 0 and top_k else []) \
        + ([TopP(top_p)] if temperature > 0 and top_p < 1 else [])
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts_per_batch = max(1, batch_size // n)
    out = Completions()
    cost = engine == "tether" and bool(processors)
    costs: list[float] = []
    was_training = model.training
    model.eval()
    starts = range(0, len(prompt_ids), prompts_per_batch)
    for b, start in enumerate(tqdm(starts, desc=desc, disable=not progress, leave=False)):
        batch_prompts = [list(p) for p in prompt_ids[start:start + prompts_per_batch]]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + first_batch + b)
        common = dict(n=n, max_new_tokens=max_new_tokens, temperature=temperature, processors=chain,
                      first_row=len(out.prompt_index), eos=eos, pad=pad, stop_strings=tuple(stop_strings),
                      tokenizer=tokenizer, gen=gen)
        if engine == "tether":
            batch = _sample_batch(model, batch_prompts, n_reporting=n_reporting, n_costed=len(processors) if cost
                                  else 0, checked=bool(processors),
                                  lean_decode=supports(model) if lean_decode is None else lean_decode, **common)
        else:
            batch = _sample_batch_hf(model, batch_prompts, **common)
        for k, (tokens, logps, finished, kl) in enumerate(batch):
            i = start + k // n
            out.prompt_index.append(i)
            out.prompt_ids.append(list(prompt_ids[i]))
            out.completion_ids.append(tokens)
            out.logprobs.append(logps)
            out.texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
            out.finished.append(finished)
            costs.append(kl)
    if cost:
        out.kl_cost = torch.tensor(costs, dtype=torch.float64)
    model.train(was_training)
    return out


def _check_context(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Refuse prompts that, with ``max_new_tokens``, do not fit the model's context (``max_position_embeddings``):
    beyond it the positions are ones the model never saw. Prompts are never truncated silently."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    long = [i for i, p in enumerate(prompt_ids) if len(p) + max_new_tokens > limit]
    if long:
        raise ValueError(f"sample: prompt(s) {long[:5]}{' …' if len(long) > 5 else ''} ({len(long)} of "
                         f"{len(prompt_ids)}; the longest {max(len(prompt_ids[i]) for i in long)} tokens) plus "
                         f"max_new_tokens={max_new_tokens} exceed the model's context of {limit} positions; shorten "
                         "those prompts or lower max_new_tokens")


def _choose(logits: torch.Tensor, temperature: float, processors: list, n_reporting: int, rows: torch.Tensor | None,
            gen: torch.Generator, checked: bool,
            n_costed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The token of each live row and its recorded log-prob, both (R,), from the step's logits (R, V): temperature,
    the processors that change the recorded log-probs, the log-softmax that is recorded, the draw-only processors,
    then the inverse-CDF draw (arg-max at temperature 0). ``checked``: fail on a row the processors left without
    an allowed token, or a drawn token the recorded distribution gives probability 0.

    ``n_costed > 0``: also return (R,) float64 KL(softmax(s) ‖ softmax(logits / T)), s the scores after the first
    ``n_costed`` processors (the caller's; ``Completions.kl_cost``), computed in float64 from the fp32 scores (a
    float32 sum over 49k tokens would leave ~1e-7 of noise, negative KLs included), exactly 0 where they returned
    their input unchanged; else None."""
    scores = logits.float()
    if temperature > 0:
        scores = scores / temperature
    base = costed = scores
    for i, p in enumerate(processors[:n_reporting]):
        scores = p(scores, rows)
        if i < n_costed:
            costed = scores
    reported = scores
    logp_all = F.log_softmax(reported, dim=-1)
    for i, p in enumerate(processors[n_reporting:], n_reporting):
        scores = p(scores, rows)
        if i < n_costed:
            costed = scores
    if checked and not torch.isfinite(scores.amax(-1)).all():
        bad = (~torch.isfinite(scores.amax(-1))).nonzero().flatten()
        raise ValueError(f"sample: the logits processors left completion(s) {rows[bad].tolist()} with no allowed "
                         "token (every score -inf)")
    if temperature > 0:
        nxt = _draw(logp_all.exp() if scores is reported else scores.softmax(-1), gen)
    else:
        nxt = scores.argmax(-1)
    chosen = logp_all.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    if torch.isnan(chosen).any():  # NaN or +inf logits make the whole row's log-softmax NaN
        raise ValueError("sample: the model's logits hold NaN or inf (its weights are not finite), so no token can "
                         "be drawn; use a model with finite weights")
    if checked and torch.isneginf(chosen).any():
        bad = torch.isneginf(chosen).nonzero().flatten()
        raise ValueError(f"sample: completion(s) {rows[bad].tolist()} drew a token that a processor with "
                         "changes_logprobs=True had banned: a later processor raised a -inf score")
    kl = None
    if n_costed:
        kl = (torch.zeros(len(nxt), dtype=torch.float64, device=nxt.device) if costed is base
              else reverse_kl(costed.double(), base.double()))
    return nxt, chosen, kl


def _check_hf_processors(processors: list) -> None:
    for i, p in enumerate(processors):
        why = ("changes the recorded log-probs" if p.changes_logprobs
               else "keeps per-row state (start/accept)" if is_stateful(p) else None)
        if why:
            raise ValueError(f"sample(engine='hf'): processors[{i}] ({type(p).__name__}) {why}; model.generate keeps "
                             "finished rows in the batch and the log-probs are recomputed by teacher forcing without "
                             "processors, so only stateless, draw-only processors are supported there: use "
                             "engine='tether'")


class _HFChain:
    """Temperature scaling and a draw-only processor chain as one ``transformers`` logits processor, so
    ``model.generate`` draws from the same distribution as tether's loop. ``generate`` keeps finished rows in the
    batch, so every call sees all rows: ``rows`` are the batch's completions."""

    def __init__(self, processors: list, temperature: float, rows: torch.Tensor):
        self.processors, self.temperature, self.rows = processors, temperature, rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.temperature > 0:
            scores = scores / self.temperature
        for p in self.processors:
            scores = p(scores, self.rows)
        return scores


def _sample_batch_hf(model, prompts, *, n, max_new_tokens, temperature, processors, first_row, eos, pad,
                     stop_strings, tokenizer, gen):
    from transformers import LogitsProcessorList

    from tether.logprobs import IGNORE_INDEX, hidden_states, lm_head, token_stats

    rows = [p for p in prompts for _ in range(n)]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, p in enumerate(rows):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    device = next(model.parameters()).device
    kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    # Temperature, top-k and top-p run in tether's chain (generate's own warpers off: it would apply them after
    # the chain, and the model's generation config may set them).
    kwargs.update(dict(temperature=1.0, top_p=1.0, top_k=0) if temperature > 0
                  else dict(temperature=None, top_p=None, top_k=None))
    if temperature > 0 or processors:
        completions = torch.arange(first_row, first_row + len(rows), device=device)
        kwargs.update(logits_processor=LogitsProcessorList([_HFChain(processors, temperature, completions)]))
    if stop_strings:
        kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)[:, width:].tolist()
    results = []
    for gen_ids in out:
        cut, finished = len(gen_ids), False
        if eos in gen_ids:
            cut, finished = gen_ids.index(eos) + 1, True
        if stop_strings:
            for t in range(1, cut + 1):
                if any(s_ in tokenizer.decode(gen_ids[:t], skip_special_tokens=True) for s_ in stop_strings):
                    cut, finished = t, True
                    break
        results.append((gen_ids[:cut], finished))
    # Sampler log-probs: one teacher-forced pass over prompt + completion at the sampling temperature.
    T = max(len(p) + len(c) for p, (c, _) in zip(rows, results))
    full = torch.full((len(rows), T), pad, dtype=torch.long)
    full_mask = torch.zeros_like(full)
    labels = torch.full_like(full, IGNORE_INDEX)
    for r, (p, (c, _)) in enumerate(zip(rows, results)):
        full[r, :len(p) + len(c)] = torch.tensor(p + c)
        full_mask[r, :len(p) + len(c)] = 1
        labels[r, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)
    weight, bias = lm_head(model)
    full, full_mask, labels = full.to(device), full_mask.to(device), labels.to(device)
    logps = token_stats(hidden_states(model, full, full_mask), weight, labels, bias=bias,
                        temperature=temperature if temperature > 0 else 1.0)["logps"]
    return [(c, logps[r][labels[r] != IGNORE_INDEX].tolist(), f, None) for r, (c, f) in enumerate(results)]


def _sample_batch(model, prompts, *, n, max_new_tokens, temperature, processors, n_reporting, n_costed, checked,
                  first_row, lean_decode, eos, pad, stop_strings, tokenizer, gen):
    from transformers import DynamicCache

    P, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((P, width), pad, dtype=torch.long)
    mask = torch.zeros((P, width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    # transformers ≥ 5.24 calls the cache argument `cache`; earlier versions `past_key_values`.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                   **{cache_kw: cache}).logits[:, -1]
    # One prefill per prompt, then n copies of its cache.
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, mask, positions = (t.repeat_interleave(n, dim=0) for t in (logits, mask, positions))
    rows = P * n
    decoder = None
    if lean_decode:  # one-token steps through tether.sampling.decode (same logits, faster on small batches)
        decoder = LlamaDecoder(model)
        decoder.start(cache, mask, max_new_tokens)
        cache = None
    alive = torch.arange(rows, device=device)  # which original row each live batch row is
    next_pos = positions[:, -1] + 1
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logps: list[list[float]] = [[] for _ in range(rows)]
    finished = [False] * rows
    kl_cost = torch.zeros(rows, dtype=torch.float64)  # Completions.kl_cost of each row
    stop_window = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stop_strings), default=0) + 2
    stateful = [p for p in processors if is_stateful(p)]
    for p in stateful:
        p.start(alive + first_row)
    for _ in range(max_new_tokens):
        completions = alive + first_row if processors else None  # what the processors call rows
        nxt, chosen_logp, step_kl = _choose(logits, temperature, processors, n_reporting, completions, gen, checked,
                                            n_costed)
        if step_kl is not None:
            kl_cost.index_add_(0, alive.cpu(), step_kl.cpu())
        ended = [False] * len(alive)  # rows a processor finishes
        for p in stateful:
            if (done := p.accept(nxt, completions)) is not None:
                ended = [a or bool(d) for a, d in zip(ended, done.tolist())]
        keep = []
        for j, row in enumerate(alive.tolist()):
            tok = int(nxt[j])
            tokens[row].append(tok)
            logps[row].append(float(chosen_logp[j]))
            done = tok == eos or ended[j]
            if not done and stop_strings:
                tail = tokenizer.decode(tokens[row][-stop_window:], skip_special_tokens=True)
                done = any(s in tail for s in stop_strings)
            if done:
                finished[row] = True
            else:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(alive):
            idx = torch.tensor(keep, device=device)
            if decoder is not None:
                decoder.keep(idx)
            else:
                cache.batch_select_indices(idx)
            alive, nxt, mask, next_pos = alive[idx], nxt[idx], mask[idx], next_pos[idx]
        if decoder is not None:
            logits = decoder.step(nxt, next_pos)
        else:
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            logits = model(input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=next_pos.unsqueeze(-1),
                           use_cache=True, **{cache_kw: cache}).logits[:, -1]
        next_pos = next_pos + 1
    return [(tokens[r], logps[r], finished[r], float(kl_cost[r])) for r in range(rows)]
