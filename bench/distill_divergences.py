"""Benchmark: chunked teacher–student divergences (``tether.head_divergence``) vs plain full-logit ones, CPU, fp32.

    python bench/distill_divergences.py          # writes bench/results/distill_divergences.json (~3 min, 2 cores)
    python bench/distill_divergences.py --batch 1 --length 64 --rounds 1 --no-write                  # smoke run
    python bench/distill_divergences.py --chunk-size 128 --out bench/results/distill_divergences_chunk128.json

What one measurement is: forward + backward of ``divergence(student, teacher).sum()`` per position, from LM-head
inputs, at SmolLM2's shapes — vocabulary V = 49,152, hidden width 576, batch 2 × length 512 = N = 1,024 positions
(every position scored, as in a distillation batch of full-length responses). Gradients flow to the student's hidden
states and its (V, H) head weight; the teacher is constant. Two paths per divergence:

* ``chunked``: ``head_divergence(..., chunk_size=512)`` — the recipe's path: one chunk of both models' logits at a
  time, differentiated in the forward pass and scaled in backward (custom autograd function; never an (N, V)
  tensor).
* ``plain``: ``head_divergence_plain`` — full (N, V) logits of both models, then the divergence, plain autograd.

Divergences: forward KL, reverse KL, generalized JSD (β = 0.5, GKD's default) and AKL (μ = 0.5), plus skew KL
(α = 0.1) and total variation with ``--divergences all``.

Timing: every (divergence, path) pair runs in ONE process, interleaved: a warm-up round, then ``--rounds`` rounds,
each running every pair once in an order that rotates by one each round. The ratio per divergence is the ratio of
the median wall times (and, as a noise check, of the median CPU times and the median of the per-round ratios).

Peak memory: each (divergence, path) pair runs ALONE in a fresh child process (``--only DIV PATH``), one after the
other in the same rotating order: inputs allocated in place (no temporaries), a warm-up on a tiny problem (kernels,
allocator), then the RSS just before the measured forward + backward and the peak RSS of the process after it. The
peak is VmHWM from /proc/self/status: ``getrusage().ru_maxrss`` is inherited across fork + execve, so a child of a
large parent would report the parent's peak. The figure reported is the peak minus the RSS before: the memory the
computation itself adds, which includes the 113 MB (V, H) weight gradient both paths allocate. A child process per
measurement means no allocator cache or freed-but-resident heap from a previous measurement inflates or hides a
peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import _maxrss_bytes, _rss_bytes  # noqa: E402  (VmHWM / RSS readers shared by the benches)

ROOT = Path(__file__).resolve().parents[1]
OUT_FILE = ROOT / "bench" / "results" / "distill_divergences.json"
DIVERGENCES = {  # name: hyperparameters
    "forward_kl": {},
    "reverse_kl": {},
    "generalized_jsd": {"beta": 0.5},
    "akl": {"mu": 0.5},
}
EXTRA = {"skew_kl": {"alpha": 0.1}, "total_variation": {}}
PATHS = ("chunked", "plain")
VOCAB, HIDDEN, SEED = 49152, 576, 0
SETTINGS = {"chunk_size": 512}  # the recipes' default LM-head chunk (--chunk-size)


def make_inputs(n: int, hidden: int, vocab: int, seed: int):
    """Student hidden (N, H) and head (V, H) with gradients; teacher hidden and head constant. Logit scale ~1–3 like
    a trained LM head (normal hidden states, weights of std 0.05 → logits of std ~1.2); the teacher is the student
    plus noise, so the two distributions are close but not equal."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.empty(n, hidden).normal_(generator=g)
    w = torch.empty(vocab, hidden).normal_(0, 0.05, generator=g)
    th = torch.empty(n, hidden).normal_(generator=g).mul_(0.3).add_(h)
    tw = torch.empty(vocab, hidden).normal_(0, 0.02, generator=g).add_(w)
    return h.requires_grad_(), w.requires_grad_(), th, tw


def run(path: str, name: str, h, w, th, tw) -> float:
    """Forward + backward of the summed divergence; returns the value (gradients accumulate in h.grad, w.grad)."""
    from tether.head_divergence import head_divergence, head_divergence_plain

    kw = dict(divergence=name, **{**DIVERGENCES, **EXTRA}[name])
    if path == "chunked":
        out = head_divergence(h, w, th, tw, chunk_size=SETTINGS["chunk_size"], **kw)
    else:
        out = head_divergence_plain(h, w, th, tw, **kw)
    total = out.sum()
    total.backward()
    return float(total.detach())


def run_only(name: str, path: str, n: int) -> dict:
    """One measurement alone in this (fresh) process: peak RSS added by one forward + backward."""
    small = make_inputs(8, HIDDEN, 64, SEED)  # warm-up: kernels and allocator, negligible memory
    run(path, name, *small)
    del small
    h, w, th, tw = make_inputs(n, HIDDEN, VOCAB, SEED)
    before, hwm_before = _rss_bytes(), _maxrss_bytes()
    t0 = time.perf_counter()
    value = run(path, name, h, w, th, tw)
    seconds = time.perf_counter() - t0
    peak = _maxrss_bytes()
    return {"divergence": name, "path": path, "rss_before_bytes": before, "peak_rss_bytes": peak,
            "peak_increase_bytes": peak - before, "hwm_above_rss_before_bytes": max(0, hwm_before - before),
            "value": value, "seconds_in_child": seconds}


def interleaved(pairs: list[tuple[str, str]], n: int, rounds: int) -> dict:
    import torch

    h, w, th, tw = make_inputs(n, HIDDEN, VOCAB, SEED)
    records: dict[str, list[dict]] = {f"{d}/{p}": [] for d, p in pairs}
    grads: dict[str, tuple] = {}
    for r in range(rounds + 1):  # round 0 = warm-up
        k = r % len(pairs)
        for name, path in pairs[k:] + pairs[:k]:
            h.grad = w.grad = None
            c0, t0 = time.process_time(), time.perf_counter()
            value = run(path, name, h, w, th, tw)
            rec = {"round": r, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                   "value": value, "loadavg_1min": os.getloadavg()[0]}
            records[f"{name}/{path}"].append(rec)
            if r == 0:
                grads[f"{name}/{path}"] = (h.grad.clone(), w.grad.clone())
            print(f"[round {r}{' warm-up' if r == 0 else ''}] {name}/{path}: {rec['seconds']:.2f}s "
                  f"(cpu {rec['cpu_seconds']:.1f}s, load {rec['loadavg_1min']:.1f}) value {value:.4f}", flush=True)
    # the two paths compute the same thing: value and gradients (checked once, from the warm-up round)
    agree = {}
    for name in dict.fromkeys(d for d, _ in pairs):
        (gh_c, gw_c), (gh_p, gw_p) = grads[f"{name}/chunked"], grads[f"{name}/plain"]
        v_c, v_p = records[f"{name}/chunked"][0]["value"], records[f"{name}/plain"][0]["value"]
        agree[name] = {"value_rel_diff": abs(v_c - v_p) / max(abs(v_p), 1e-30),
                       "grad_hidden_max_abs_diff": float((gh_c - gh_p).abs().max()),
                       "grad_weight_max_abs_diff": float((gw_c - gw_p).abs().max()),
                       "grad_hidden_max_abs": float(gh_p.abs().max()),
                       "grad_weight_max_abs": float(gw_p.abs().max())}
    del torch
    return {"records": records, "agreement": agree}


def children(pairs: list[tuple[str, str]], n: int, threads: int) -> dict:
    out = {}
    for name, path in pairs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", name, path, "--threads", str(threads),
               "--n", str(n), "--chunk-size", str(SETTINGS["chunk_size"])]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"child {name}/{path} failed:\n{proc.stderr[-4000:]}")
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        out[f"{name}/{path}"] = rec
        print(f"[child] {name}/{path}: peak increase {rec['peak_increase_bytes'] / 2**20:.1f} MB", flush=True)
    return out


def summarize(pairs, inter, mem, meta) -> dict:
    med = statistics.median
    per = {}
    for key, recs in inter["records"].items():
        timed = [r for r in recs if r["round"] > 0]
        per[key] = {"median_seconds": round(med(r["seconds"] for r in timed), 4),
                    "median_cpu_seconds": round(med(r["cpu_seconds"] for r in timed), 4),
                    "seconds": [round(r["seconds"], 4) for r in timed],
                    "warmup_seconds": round(recs[0]["seconds"], 4),
                    "peak_increase_mb": round(mem[key]["peak_increase_bytes"] / 2**20, 1),
                    "rss_before_mb": round(mem[key]["rss_before_bytes"] / 2**20, 1),
                    "hwm_above_rss_before_mb": round(mem[key]["hwm_above_rss_before_bytes"] / 2**20, 1)}
    ratios = {}
    for name in dict.fromkeys(d for d, _ in pairs):
        c, p = inter["records"][f"{name}/chunked"], inter["records"][f"{name}/plain"]
        paired = [a["seconds"] / b["seconds"] for a, b in zip(c, p) if a["round"] > 0]
        ratios[name] = {
            "time_ratio_chunked_over_plain": round(per[f"{name}/chunked"]["median_seconds"]
                                                   / per[f"{name}/plain"]["median_seconds"], 3),
            "check_median_of_per_round_ratios": round(med(paired), 3),
            "check_cpu_time_ratio": round(per[f"{name}/chunked"]["median_cpu_seconds"]
                                          / per[f"{name}/plain"]["median_cpu_seconds"], 3),
            "peak_memory_ratio_chunked_over_plain": round(mem[f"{name}/chunked"]["peak_increase_bytes"]
                                                          / mem[f"{name}/plain"]["peak_increase_bytes"], 3),
            "peak_increase_mb": {"chunked": per[f"{name}/chunked"]["peak_increase_mb"],
                                 "plain": per[f"{name}/plain"]["peak_increase_mb"]},
            "median_seconds": {"chunked": per[f"{name}/chunked"]["median_seconds"],
                               "plain": per[f"{name}/plain"]["median_seconds"]},
        }
    return {"meta": meta, "ratios": ratios, "agreement_chunked_vs_plain": inter["agreement"], "measurements": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds (after one warm-up round)")
    ap.add_argument("--divergences", default=",".join(DIVERGENCES), help="comma-separated, or 'all'")
    ap.add_argument("--chunk-size", type=int, default=SETTINGS["chunk_size"], help="positions per chunk (chunked path)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(OUT_FILE))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--only", nargs=2, metavar=("DIVERGENCE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    SETTINGS["chunk_size"] = args.chunk_size
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.only:
        print(json.dumps(run_only(args.only[0], args.only[1], args.n)))
        return
    names = list({**DIVERGENCES, **EXTRA}) if args.divergences == "all" else args.divergences.split(",")
    pairs = [(d, p) for d in names for p in PATHS]
    n = args.batch * args.length
    t0 = time.perf_counter()
    meta = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch_threads": threads},
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "setting": {"batch": args.batch, "length": args.length, "positions": n, "hidden": HIDDEN,
                        "vocab": VOCAB, "chunk_size": SETTINGS["chunk_size"], "dtype": "float32",
                        "timed_rounds": args.rounds,
                        "hyperparameters": {d: {**DIVERGENCES, **EXTRA}[d] for d in names}}}
    mem = children(pairs, n, threads)  # first, while this process is small
    inter = interleaved(pairs, n, args.rounds)
    meta["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result = summarize(pairs, inter, mem, meta)
    if not args.no_write:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": result["ratios"], "agreement": result["agreement_chunked_vs_plain"],
                      "wall_seconds": meta["wall_seconds"]}, indent=2))


if __name__ == "__main__":
    main()
