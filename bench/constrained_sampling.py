"""Benchmark: per-token cost of grammar-constrained vs unconstrained sampling, embedded SmolLM2-135M-Instruct.

    python bench/constrained_sampling.py            # writes bench/results/constrained_sampling.json (~3 min, 2 cores)
    python bench/constrained_sampling.py --rounds 1 --tokens 8 --no-write              # smoke

Both arms run ``tether.sampling.sample`` on the same chat-templated prompt, ``--rows`` (16) completions in one batch,
temperature 1, exactly ``--tokens`` new tokens per row, so the two arms decode the same number of steps at the same
batch size and their per-token costs compare like for like:

* ``constrained``: :class:`tether.sampling.constraints.ConstraintProcessor` with a JSON schema — an array of at
  least 50 nested person objects, so no row can finish inside the token budget (the grammar keeps the end-of-sequence
  token banned); every step fills 16 llguidance bitmasks, unpacks them and masks the logits, and every accepted
  token advances 16 matchers.
* ``unconstrained``: no grammar; the end-of-sequence token is banned by a one-line stateless processor so that rows
  do not finish early (that processor's cost, one ``index_fill`` per step, counts against the unconstrained arm, so
  the ratio is, if anything, a hair optimistic).

Rounds alternate the starting arm; each round's per-token cost is wall seconds / generated tokens (including
prefill, identical in both arms). The ratio is of the median per-token costs; per-round ratios and CPU-time ratios
are recorded as noise checks. The processor's own time (``__call__`` and ``accept``) is measured separately in CPU
seconds, as its share of the constrained arm. Target: ratio ≤ 1.10.

``--kernel`` also times the mask application alone on (rows, vocab) logits: tether's unpack + ``ban`` (and its
``masked_fill`` twin) vs llguidance's ``apply_token_bitmask_inplace`` (``torch.compile``'d; needs a C++ compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT_FILE = ROOT / "bench" / "results" / "constrained_sampling.json"

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "address": {"type": "object",
                                     "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                     "required": ["city", "zip"], "additionalProperties": False}},
          "required": ["name", "age", "address"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": PERSON, "minItems": 50}
PROMPT = ('Reply with only a JSON array of people, each {"name": ..., "age": ..., '
          '"address": {"city": ..., "zip": "5 digits"}}.')


class BanToken:
    """Stateless: bans one token (the unconstrained arm's end-of-sequence, so rows run the full budget)."""

    changes_logprobs = True

    def __init__(self, token: int):
        self.token = torch.tensor([token])

    def __call__(self, scores, rows):
        return scores.index_fill(-1, self.token.to(scores.device), float("-inf"))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timed:
    """Wraps a stateful processor, adding up the CPU seconds of its calls."""

    def __init__(self, inner):
        self.inner, self.changes_logprobs, self.seconds = inner, inner.changes_logprobs, 0.0

    def __call__(self, scores, rows):
        t = cpu_seconds()
        out = self.inner(scores, rows)
        self.seconds += cpu_seconds() - t
        return out

    def start(self, rows):
        self.inner.start(rows)

    def accept(self, tokens, rows):
        t = cpu_seconds()
        out = self.inner.accept(tokens, rows)
        self.seconds += cpu_seconds() - t
        return out


def run_arm(arm, model, tok, prompt, args, seed):
    from tether.sampling import sample
    from tether.sampling.constraints import Constraint, ConstraintProcessor

    if arm == "constrained":
        proc = Timed(ConstraintProcessor(Constraint.json_schema(SCHEMA), tok))
    else:
        proc = BanToken(tok.eos_token_id)
    w, c = time.perf_counter(), cpu_seconds()
    done = sample(model, tok, prompt, n=args.rows, max_new_tokens=args.tokens, temperature=1.0, seed=seed,
                  batch_size=args.rows, processors=[proc])
    wall, cpu = time.perf_counter() - w, cpu_seconds() - c
    tokens = sum(len(ids) for ids in done.completion_ids)
    if tokens != args.rows * args.tokens:
        raise RuntimeError(f"{arm}: {tokens} tokens, expected {args.rows} × {args.tokens} (a row finished early)")
    return dict(wall_s=wall, cpu_s=cpu, tokens=tokens, ms_per_token=1e3 * wall / tokens,
                processor_cpu_s=getattr(proc, "seconds", 0.0), sample_text=done.texts[0][:120])


def kernel_timing(rows: int, vocab: int, repeats: int = 20, rounds: int = 5) -> dict:
    """Mask application alone on (rows, vocab) fp32 logits and a random packed mask: tether's unpack + ``ban`` (a
    new tensor), the same with ``masked_fill``, and llguidance's compiled in-place kernel on a copy (``clone``
    included, so all leave the logits intact). Best of ``rounds`` rounds of ``repeats`` calls each, alternating."""
    import timeit

    from tether.sampling.constraints import ban, unpack_bitmask

    gen = torch.Generator().manual_seed(0)
    words = (vocab + 31) // 32
    mask = torch.randint(-2**31, 2**31 - 1, (rows, words), generator=gen, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(rows, vocab, generator=gen)

    def ours():
        return ban(logits, unpack_bitmask(mask, vocab))

    def twin():
        return logits.masked_fill(~unpack_bitmask(mask, vocab), float("-inf"))

    fns = {"tether_unpack_ban_ms": ours, "tether_unpack_masked_fill_ms": twin}
    out = {}
    try:
        from llguidance.torch import apply_token_bitmask_inplace

        def theirs():
            x = logits.clone()
            apply_token_bitmask_inplace(x, mask)
            return x

        t = time.perf_counter()
        assert torch.equal(theirs(), ours())  # the first call compiles
        out["llguidance_compile_s"] = time.perf_counter() - t
        fns["llguidance_apply_inplace_ms"] = theirs
    except Exception as e:  # no compiler, or another backend problem: say so, do not hide it
        out["llguidance_apply_inplace_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], timeit.timeit(fn, number=repeats) / repeats * 1e3)
    return {**out, **best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernel", action="store_true", help="also time the mask application alone")
    parser.add_argument("--out", type=Path, default=OUT_FILE)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tether.models import load_model, load_tokenizer
    from tether.sampling import render_prompts
    from tether.sampling.constraints import ll_tokenizer

    model, tok = load_model(), load_tokenizer()
    prompt = render_prompts(tok, [PROMPT])
    ll_tokenizer(tok)  # the one-off tokenizer set-up (cached), outside the timed rounds
    arms = ["unconstrained", "constrained"]
    run_arm("constrained", model, tok, prompt, argparse.Namespace(rows=args.rows, tokens=4), seed=999)  # warm-up
    run_arm("unconstrained", model, tok, prompt, argparse.Namespace(rows=args.rows, tokens=4), seed=999)
    rounds = []
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        order = arms if r % 2 == 0 else arms[::-1]
        rounds.append({arm: run_arm(arm, model, tok, prompt, args, seed=r) for arm in order})
        load.append(os.getloadavg()[0])
        c, u = rounds[-1]["constrained"], rounds[-1]["unconstrained"]
        print(f"round {r}: constrained {c['ms_per_token']:.2f} ms/token, unconstrained {u['ms_per_token']:.2f} "
              f"ms/token, ratio {c['ms_per_token'] / u['ms_per_token']:.3f}; processor {c['processor_cpu_s']:.2f} "
              f"of {c['cpu_s']:.1f} CPU s", flush=True)
    med = {arm: statistics.median(x[arm]["ms_per_token"] for x in rounds) for arm in arms}
    result = {
        "ratio_median_ms_per_token": med["constrained"] / med["unconstrained"],
        "median_ms_per_token": med,
        "per_round_ratios": [x["constrained"]["ms_per_token"] / x["unconstrained"]["ms_per_token"] for x in rounds],
        "cpu_time_ratio": sum(x["constrained"]["cpu_s"] for x in rounds) / sum(x["unconstrained"]["cpu_s"]
                                                                             for x in rounds),
        "processor_share_of_constrained_cpu": sum(x["constrained"]["processor_cpu_s"] for x in rounds)
        / sum(x["constrained"]["cpu_s"] for x in rounds),
        "target": 1.10,
        "rounds": rounds,
        "settings": dict(rows=args.rows, tokens=args.tokens, rounds=args.rounds, threads=args.threads,
                         schema=SCHEMA, prompt=PROMPT),
        "machine": dict(python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(),
                        platform=platform.platform(), load_avg_1min=load),
    }
    if args.kernel:
        result["kernel"] = kernel_timing(args.rows, len(tok))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rounds", "settings")}, indent=1))
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
