"""Grammar constraints on sampling: JSON schema, regex, a choice of strings, or a Lark grammar, compiled with
llguidance and applied as a token mask at every step, one matcher per row.

* :class:`Constraint` — what the output must be (a frozen value; ``Constraint.parse("regex:[0-9]+")`` reads the
  one-line form configs use; :meth:`Constraint.check` is the config-time validation).
* :class:`ConstraintProcessor` — the logits processor of ``tether.sampling.sample`` (batched, the lean decode path
  included): ``changes_logprobs = True``, so the log-probs the sampler records are those of the constrained
  distribution the token was drawn from. With ``delimiters=(open, close)`` it is CRANE-style switching (below).
* :class:`HFConstraintProcessor` — the same constraint as a ``transformers`` logits processor:
  ``model.generate(..., logits_processor=[HFConstraintProcessor(constraint, tokenizer)])``.

The law of one step
-------------------
With scores ``s = logits / T`` over the vocabulary and ``A_t`` the set of tokens the grammar allows after the
prefix ``y_<t`` (a token is allowed when the text so far followed by the token's text is a prefix of some string of
the language; the end-of-sequence token when the text so far is in the language), the sampler draws from

    q(y_t | y_<t) = softmax(s)[y_t] · 1[y_t ∈ A_t] / m_t,      m_t = Σ_{v ∈ A_t} softmax(s)[v],

and records ``log q(y_t | y_<t)``: the model's law restricted to the allowed tokens and renormalised. Over a whole
completion, ``q(y) = p(y) / Π_t m_t(y_<t)``. This is *not* the exact conditional ``p(y | y ∈ L) = p(y) / Z``
(``Z`` the model's mass on the whole language): the two differ by the factor ``Z / Π_t m_t(y_<t)``, which is 1 for
every ``y`` only when each step's lost mass is the same along every path. Step-wise masking favours completions
whose prefixes lose little mass early; ``tests/sampling/test_constraints.py`` computes the gap
``KL(q ‖ p(· | L))`` by enumeration on a tiny grammar (see the test's docstring for the numbers). Sampling the exact
conditional needs look-ahead (e.g. importance resampling of ``q``-samples with weights ``Π_t m_t``), not a mask.

CRANE-style switching
---------------------
Banerjee et al. 2025, "CRANE: Reasoning with Constrained LLM Generation" (ICML 2025, arXiv:2502.09061), §4 and
Algorithm 1: constraining a whole answer to a tight grammar removes the room for reasoning, so the model writes
free text and only the segments between an opening delimiter ``S₁`` and a closing one ``S₂`` are constrained. Per
row: start free (no mask, the model's own law); when the text generated since the last segment contains ``S₁``,
open a segment whose grammar is ``G · S₂`` (the constraint followed by the closing delimiter); when the matcher has
consumed ``S₂``, release it and go back to free text. Delimiters are found in the decoded text, not token ids, so a
delimiter split across tokens is found. Departures from the official code (uiuc-focal-lab/CRANE, ``CRANE`` class):

1. the delimiters are not part of the grammar ``G`` (the official default puts ``<<``/``>>`` inside it); the segment
   grammar appends ``S₂`` to ``G`` and the opening ``S₁`` is free text;
2. every row of a batch switches on its own (the official loop decodes one sequence);
3. when the token that completes ``S₁`` carries text after it, that text is fed to the segment's matcher as tokens
   (llguidance tokenization); if the grammar rejects it, the segment is not opened, the row stays free and the
   processor counts it in ``rejected_openings`` (nothing silent).

Implementation
--------------
The llguidance tokenizer is built once per tokenizer object (≈1 s for SmolLM2's 49k tokens) and cached; the
grammar is compiled once per processor, and each row's matcher is a copy of that template. Each step the live
constrained rows' matchers fill a packed int32 bitmask (one bit per token, ≈0.1 ms per row for SmolLM2), which is
unpacked in plain torch (:func:`unpack_bitmask`, one AND with the powers of two; :func:`unpack_bitmask_plain` is its
bit-shift twin) and applied by :func:`ban` (exact and branch-free; ``masked_fill`` is its twin). No compiled kernel:
llguidance's own ``apply_token_bitmask_inplace`` is ``torch.compile``'d, which needs a C++ compiler on CPU and
compiles on first use; ``bench/constrained_sampling.py --kernel`` times the two.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["KINDS", "Constraint", "ConstraintProcessor", "HFConstraintProcessor", "ban", "check_constraint_fields",
           "ll_tokenizer", "rollout_processors", "unpack_bitmask", "unpack_bitmask_plain"]

KINDS = ("json_schema", "regex", "choice", "lark")


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())[:300]


@dataclass(frozen=True)
class Constraint:
    """What a completion must be.

    Args:
        kind: ``"json_schema"`` (``spec`` the schema as JSON text), ``"regex"`` (the pattern, Rust ``regex`` syntax,
            matched against the whole completion), ``"choice"`` (a JSON list of the allowed strings) or ``"lark"``
            (a grammar in llguidance's Lark dialect, start rule ``start``).
        spec: the schema / pattern / list / grammar text. Build it with the class methods.
        whitespace_flexible: JSON only: allow whitespace between JSON tokens. ``False`` (the default here, not
            llguidance's) emits compact JSON, so a model cannot spend its token budget on blank space.
    """

    kind: str
    spec: str
    whitespace_flexible: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Constraint: kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | str, *, whitespace_flexible: bool = False) -> Constraint:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema), whitespace_flexible)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        return cls("lark", grammar)

    @classmethod
    def parse(cls, text: str, *, field: str = "constraint") -> Constraint:
        """The one-line form ``kind:spec``, e.g. ``regex:[0-9]{3}``, ``choice:["yes", "no"]``,
        ``json_schema:{"type": "integer"}``; ``kind:@path`` reads ``spec`` from a file. Checked (:meth:`check`)."""
        kind, sep, spec = text.partition(":")
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise ValueError(f"{field}: {text[:60]!r} is not 'kind:spec' with kind one of {', '.join(KINDS)} "
                             "(e.g. 'regex:[0-9]+', 'json_schema:@schema.json')")
        if spec.startswith("@"):
            path = Path(spec[1:])
            if not path.is_file():
                raise ValueError(f"{field}: file {str(path)!r} not found (the '@' in '{kind}:@…' reads the {kind} "
                                 "from a file; drop it to give the spec inline)")
            spec = path.read_text()
        constraint = cls(kind, spec)
        constraint.check(field=field)
        return constraint

    def _entries(self) -> list[dict]:
        """The grammar as llguidance's list of named grammars (the first is the start)."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e})") from None
            text = LLMatcher.grammar_from_json_schema(schema,
                                                      overrides={"whitespace_flexible": self.whitespace_flexible})
        elif self.kind == "regex":
            text = LLMatcher.grammar_from_regex(self.spec)
        elif self.kind == "choice":
            try:
                options = json.loads(self.spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a JSON list of strings ({e})") from None
            if not (isinstance(options, list) and options and all(isinstance(o, str) for o in options)):
                raise ValueError(f"need a non-empty JSON list of strings, got {self.spec[:60]!r}")
            return [{"lark_grammar": "start: " + " | ".join(json.dumps(o) for o in options)}]
        else:
            return [{"lark_grammar": self.spec}]
        return json.loads(text)["grammars"]

    def grammar(self, *, close: str | None = None) -> str:
        """The llguidance grammar (a JSON string). ``close``: the grammar of this constraint followed by the
        literal ``close`` (a CRANE segment, ``G · S₂``)."""
        entries = self._entries()
        if close is None:
            return json.dumps({"grammars": entries})
        body = dict(entries[0], name="crane_segment_body")
        return json.dumps({"grammars": [{"lark_grammar": f"start: @crane_segment_body {json.dumps(close)}"}, body,
                                        *entries[1:]]})

    def check(self, *, field: str = "constraint", close: str | None = None) -> None:
        """Raise a one-line ``ValueError`` naming ``field`` when the grammar does not compile."""
        from llguidance import LLMatcher

        try:
            error = LLMatcher.validate_grammar(self.grammar(close=close))
        except ValueError as e:
            error = str(e)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"{field}: invalid {self.kind} — {_one_line(error)}")


# ------------------------------------------------------------------------------------------------------------
# Tokenizer set-up (cached) and the bitmask.
# ------------------------------------------------------------------------------------------------------------

_LL_TOKENIZERS: dict[int, tuple[object, object]] = {}


def ll_tokenizer(tokenizer):
    """llguidance's view of a Hugging Face fast tokenizer (token bytes, special tokens, end-of-sequence), built
    once per tokenizer object (≈1 s for a 49k vocabulary) and cached while the tokenizer lives."""
    key = id(tokenizer)
    hit = _LL_TOKENIZERS.get(key)
    if hit is not None and hit[0]() is tokenizer:
        return hit[1]
    from llguidance.hf import from_tokenizer

    try:
        made = from_tokenizer(tokenizer)
    except ValueError as e:
        raise ValueError(f"constraints need a Hugging Face fast tokenizer: {_one_line(e)}") from None
    try:
        ref = weakref.ref(tokenizer, lambda _, key=key: _LL_TOKENIZERS.pop(key, None))
    except TypeError:  # not weak-referenceable: keep it alive with its entry
        ref = (lambda obj: (lambda: obj))(tokenizer)
    _LL_TOKENIZERS[key] = (ref, made)
    return made


_POWERS = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).to(torch.int32)  # 1, 2, 4, …, −2³¹ (bit 31)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed token mask → allowed tokens.

    Shape: ``bitmask`` (R, W) int32, bit ``k`` of word ``w`` (least significant first) = token ``32w + k``
    (llguidance's layout); output (R, vocab_size) bool. Tokens past ``32W`` are not allowed; bits past
    ``vocab_size`` are ignored. One bitwise AND of each word with the 32 powers of two, in int32 (≈0.7 ms for
    16 × 49152 on one core, vs ≈20 ms for the int64 shifts of :func:`unpack_bitmask_plain`).
    """
    rows, words = bitmask.shape
    allowed = (bitmask.unsqueeze(-1) & _POWERS.to(bitmask.device)).ne(0).reshape(rows, 32 * words)
    if vocab_size > 32 * words:
        allowed = torch.cat([allowed, allowed.new_zeros(rows, vocab_size - 32 * words)], dim=1)
    return allowed[:, :vocab_size]


def ban(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``scores`` where ``allowed``, ``-inf`` elsewhere, computed as ``scores − (¬allowed)·∞`` with the infinity
    made by overflow (``1·M·M = inf``, ``0·M·M = 0``, M the dtype's largest finite value — a fixed constant such as
    3e38 would not overflow in float64): exact (``x − 0 = x``) and branch-free. Its plain
    twin is ``scores.masked_fill(~allowed, -inf)``, which on CPU is ≈4× slower on a dense, irregular mask
    (16 × 49152, one thread: 1.8 vs 8.0 ms; mispredicted branches). Shape: (R, V) each; a new tensor."""
    big = torch.finfo(scores.dtype).max
    return scores - (~allowed).to(scores.dtype).mul_(big).mul_(big)


def unpack_bitmask_plain(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The plain twin of :func:`unpack_bitmask`: one shift per bit position."""
    rows, words = bitmask.shape
    bits = (bitmask.long()[:, :, None] >> torch.arange(32)) & 1
    allowed = bits.bool().reshape(rows, 32 * words)
    if vocab_size > 32 * words:
        allowed = torch.cat([allowed, allowed.new_zeros(rows, vocab_size - 32 * words)], dim=1)
    return allowed[:, :vocab_size]


# ------------------------------------------------------------------------------------------------------------
# The sampler's processor.
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    matcher: object | None
    """The row's llguidance matcher; None while a CRANE row writes free text."""
    free: list[int] = field(default_factory=list)
    """CRANE: the tokens generated since the last segment closed (where the opening delimiter is looked for)."""


class ConstraintProcessor:
    """A stateful logits processor of ``tether.sampling.sample`` that keeps each row inside a grammar (the module
    docstring has the law it samples and the CRANE switching).

    Args:
        constraint: what the output (or, with ``delimiters``, each delimited segment) must be.
        tokenizer: the sampler's Hugging Face fast tokenizer (its end-of-sequence token is the one the grammar
            allows where the language ends).
        delimiters: ``(open, close)`` for CRANE-style switching; ``None`` constrains the whole completion.

    ``rejected_openings`` counts CRANE segments not opened because the text after the opening delimiter, inside
    the token that completed it, was outside the grammar.
    """

    changes_logprobs = True

    def __init__(self, constraint: Constraint, tokenizer, *, delimiters: tuple[str, str] | None = None):
        from llguidance import LLMatcher

        if delimiters is not None and (len(delimiters) != 2 or not all(delimiters)):
            raise ValueError(f"ConstraintProcessor: delimiters must be two non-empty strings (open, close), "
                             f"got {delimiters!r}")
        self.constraint, self.tokenizer = constraint, tokenizer
        self.delimiters = tuple(delimiters) if delimiters is not None else None
        self.ll = ll_tokenizer(tokenizer)
        close = self.delimiters[1] if self.delimiters else None
        constraint.check(field="ConstraintProcessor", close=close)
        self.template = LLMatcher(self.ll, constraint.grammar(close=close), log_level=0)
        if self.template.is_error():
            raise ValueError(f"ConstraintProcessor: invalid {constraint.kind} — "
                             f"{_one_line(self.template.get_error())}")
        self.words = (self.ll.vocab_size + 31) // 32
        self.window = 4 * len(self.delimiters[0]) + 2 if self.delimiters else 0
        self.rows: dict[int, _Row] = {}
        self.rejected_openings = 0
        self._buffer = torch.zeros(0, self.words, dtype=torch.int32)

    def start(self, rows: torch.Tensor) -> None:
        for r in rows.tolist():
            self.rows[r] = _Row(None if self.delimiters else self.template.deep_copy())

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        states = [self.rows[r] for r in rows.tolist()]
        active = [j for j, st in enumerate(states) if st.matcher is not None]
        if not active:
            return scores
        if self._buffer.shape[0] < len(active):
            self._buffer = torch.zeros(len(active), self.words, dtype=torch.int32)
        buf = self._buffer[:len(active)]
        for k, j in enumerate(active):
            states[j].matcher.unsafe_compute_mask_ptr(buf[k].data_ptr(), 4 * self.words)
        allowed = unpack_bitmask(buf, scores.shape[-1]).to(scores.device)
        if len(active) == len(states):
            return ban(scores, allowed)
        idx = torch.tensor(active, device=scores.device)
        out = scores.clone()
        out[idx] = ban(scores[idx], allowed)
        return out

    def accept(self, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        for tok, r in zip(tokens.tolist(), rows.tolist()):
            st = self.rows[r]
            if st.matcher is not None:
                if not st.matcher.consume_token(tok):
                    raise ValueError(f"ConstraintProcessor: completion {r} drew token {tok}, which its grammar "
                                     f"rejects ({_one_line(st.matcher.get_error())}); a processor after this one "
                                     "must not raise a banned (-inf) score")
                if self.delimiters and st.matcher.is_stopped():  # the closing delimiter is in: free text again
                    st.matcher, st.free = None, []
            elif self.delimiters:
                st.free.append(tok)
                self._maybe_open(st)
        return None

    def _maybe_open(self, st: _Row) -> None:
        text = self.tokenizer.decode(st.free[-self.window:], skip_special_tokens=True)
        at = text.find(self.delimiters[0])
        if at < 0:
            return
        st.free = []
        matcher = self.template.deep_copy()
        rest = text[at + len(self.delimiters[0]):]
        if rest and not matcher.consume_tokens(self.ll.tokenize_str(rest)):
            self.rejected_openings += 1
            return
        st.matcher = None if matcher.is_stopped() else matcher


class HFConstraintProcessor:
    """A :class:`Constraint` as a ``transformers`` logits processor:
    ``model.generate(ids, logits_processor=LogitsProcessorList([HFConstraintProcessor(c, tokenizer)]))``.

    ``generate`` calls it with the ids so far and the next-token scores of every row; it tells each row's matcher
    the token appended since the last call (``input_ids[:, -1]``), and stops tracking a row once it has drawn the
    end-of-sequence token (``generate`` pads finished rows). A call whose ids do not extend the previous call's by
    one token starts a new generation (fresh matchers), so one object can serve successive ``generate`` calls.
    """

    def __init__(self, constraint: Constraint, tokenizer, *, delimiters: tuple[str, str] | None = None):
        self.inner = ConstraintProcessor(constraint, tokenizer, delimiters=delimiters)
        self.eos = tokenizer.eos_token_id
        self._last: torch.Tensor | None = None
        self._live: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B = input_ids.shape[0]
        last = self._last
        if last is None or last.shape[0] != B or input_ids.shape[1] != last.shape[1] + 1 \
                or not torch.equal(input_ids[:, :-1], last):
            self.inner.start(torch.arange(B))
            self._live = list(range(B))
        else:
            appended = input_ids[:, -1].tolist()
            self.inner.accept(torch.tensor([appended[b] for b in self._live if appended[b] != self.eos]),
                              torch.tensor([b for b in self._live if appended[b] != self.eos]))
            self._live = [b for b in self._live if appended[b] != self.eos]
        self._last = input_ids.clone()
        if not self._live:
            return scores
        if len(self._live) == B:
            return self.inner(scores, torch.arange(B))
        idx = torch.tensor(self._live, device=scores.device)
        out = scores.clone()
        out[idx] = self.inner(scores[idx], idx.cpu())
        return out


def rollout_processors(constraint: str, delimiters: Sequence[str], tokenizer) -> list[ConstraintProcessor]:
    """The processors of a recipe's ``constraint`` / ``constraint_delimiters`` config fields: ``[]`` when
    ``constraint`` is empty, else one :class:`ConstraintProcessor`."""
    if not constraint:
        return []
    return [ConstraintProcessor(Constraint.parse(constraint), tokenizer,
                                delimiters=tuple(delimiters) if delimiters else None)]


def check_constraint_fields(constraint: str, delimiters: Sequence[str], *, engine: str = "tether") -> None:
    """Config-time validation of a recipe's ``constraint`` / ``constraint_delimiters`` fields: one-line
    ``ValueError`` naming the field (the grammar is compiled without a tokenizer, so no model is loaded)."""
    if delimiters and (len(delimiters) != 2 or not all(delimiters)):
        raise ValueError(f"constraint_delimiters: need [open, close], two non-empty strings, got {list(delimiters)!r}")
    if delimiters and not constraint:
        raise ValueError("constraint_delimiters: set without a constraint; give constraint: 'kind:spec' (the grammar "
                         "of the delimited segments) or remove the delimiters")
    if constraint and engine != "tether":
        raise ValueError(f"constraint: needs engine tether (the grammar is a per-row logits processor of tether's "
                         f"sampler), got engine {engine!r}")
    if constraint:
        Constraint.parse(constraint, field="constraint").check(field="constraint",
                                                               close=delimiters[1] if delimiters else None)
