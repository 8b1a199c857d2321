"""Benchmark: best-of-N with batched candidates vs a loop of single generations, embedded SmolLM2-135M-Instruct.

    python bench/best_of_n.py                 # writes bench/results/best_of_n.json (a few minutes on 2 cores)
    python bench/best_of_n.py --rounds 1 --prompts 2 --max-new-tokens 8 --no-write     # smoke

Identical for both: the first ``--prompts`` rows of ``data/ifeval_heldout_prompts.jsonl`` (chat-templated), N
candidates per prompt, at most ``--max-new-tokens`` new tokens, temperature 1 (no top-k / top-p), the rule reward
``tether.rewards.InstructionFollowingReward``, best-of-N selection by ``tether.inference.best_of_n``.

* ``batched``: ``tether.inference.draw_candidates`` — one ``tether.sampling.sample`` call, N completions of every
  prompt generated together (each prompt prefilled once, its cache copied N times) — then reward and selection.
* ``loop``: the same N·P completions drawn one at a time, ``sample(n=1)`` per completion (one prefill each), then
  the same reward and selection.

Each round runs both, the starting one alternating; the seeds of round r are the same for both (batched: seed r;
loop: seed r·10⁶ + k for completion k), so every round compares fixed, reproducible draws. Throughput = generated
tokens (end-of-sequence tokens included) / wall seconds of sampling + reward + selection. The ratio is of the median
tokens/s over rounds; the per-round ratios are recorded too. Target: ≥ 3× at N = 8 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT_FILE = ROOT / "bench" / "results" / "best_of_n.json"


def run_batched(model, tok, rows, reward, n, max_new_tokens, seed):
    from tether.inference import best_of_n, draw_candidates

    cands = draw_candidates(model, tok, rows, reward, n=n, base_samples=0, max_new_tokens=max_new_tokens,
                            temperature=1.0, seed=seed, batch_size=64)
    best_of_n(cands.rewards, cands.scored, generator=torch.Generator().manual_seed(seed))
    return sum(len(c) for c in cands.done.completion_ids)


def run_loop(model, tok, rows, reward, n, max_new_tokens, seed):
    from tether.inference import best_of_n
    from tether.sampling import render_prompts, sample

    ids = render_prompts(tok, [r["prompt"] for r in rows])
    rewards = torch.zeros(len(rows), n, dtype=torch.float64)
    tokens = 0
    for i, (p, row) in enumerate(zip(ids, rows)):
        for j in range(n):
            done = sample(model, tok, [p], n=1, max_new_tokens=max_new_tokens, temperature=1.0,
                          seed=seed * 1_000_000 + i * n + j)
            tokens += len(done.completion_ids[0])
            r = reward(row["prompt"], done.texts[0], {**row, "completion_tokens": len(done.completion_ids[0])})
            rewards[i, j] = 0.0 if r is None else r
    best_of_n(rewards, generator=torch.Generator().manual_seed(seed))
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT_FILE)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from tether.data import load_prompt_rows
    from tether.models import load_model, load_tokenizer
    from tether.rewards import InstructionFollowingReward

    torch.set_num_threads(args.threads)
    rows = load_prompt_rows(ROOT / "data" / "ifeval_heldout_prompts.jsonl")[:args.prompts]
    tok, model = load_tokenizer(), load_model().eval()
    reward = InstructionFollowingReward()
    impls = {"batched": run_batched, "loop": run_loop}
    # Warm-up (one short call each: allocator, lazy imports).
    for fn in impls.values():
        fn(model, tok, rows[:1], reward, 2, 4, seed=999)
    per_round = []
    for r in range(args.rounds):
        order = list(impls) if r % 2 == 0 else list(reversed(impls))
        res = {}
        for name in order:
            t0 = time.perf_counter()
            tokens = impls[name](model, tok, rows, reward, args.n, args.max_new_tokens, seed=r)
            secs = time.perf_counter() - t0
            res[name] = {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs}
        res["ratio"] = res["batched"]["tokens_per_s"] / res["loop"]["tokens_per_s"]
        per_round.append(res)
        print(f"round {r}: batched {res['batched']['tokens_per_s']:.1f} tok/s ({res['batched']['tokens']} tokens, "
              f"{res['batched']['seconds']:.1f} s), loop {res['loop']['tokens_per_s']:.1f} tok/s "
              f"({res['loop']['tokens']} tokens, {res['loop']['seconds']:.1f} s): {res['ratio']:.2f}×")
    med = {k: statistics.median(x[k]["tokens_per_s"] for x in per_round) for k in impls}
    out = {"n": args.n, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
           "threads": args.threads, "median_tokens_per_s": med, "ratio_of_medians": med["batched"] / med["loop"],
           "median_of_round_ratios": statistics.median(x["ratio"] for x in per_round), "per_round": per_round,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "load_average_1min_at_end": os.getloadavg()[0]}}
    print(f"batched / loop tokens/s (ratio of medians): {out['ratio_of_medians']:.2f}× at N = {args.n}")
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
