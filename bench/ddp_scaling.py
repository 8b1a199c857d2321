"""Scaling of a DPO step from 1 to 2 processes (torchrun, gloo on CPU / NCCL on GPU) and its communication share.

    python bench/ddp_scaling.py [--model smollm2-135m-instruct] [--pairs 8] [--steps 3] [--mode ddp|fsdp2]

Launches ``torchrun --nproc_per_node W`` (meeting at 127.0.0.1) for W = 1 and W = 2, one after the other in this
run, on the same global micro-batch of ``--pairs`` preference pairs (``data/ifeval_pairs_smollm2.jsonl``; each rank
takes pairs/W of it, as the recipe does). Each process times ``--steps`` forward + backward + AdamW steps (after one
warm-up step) through ``tether.distributed.Trainable`` — the recipe's path: the loss inside the wrapper's forward —
twice: with gradient synchronization, and with it off (``Trainable.sync(False)``: no all-reduce / reduce-scatter,
a wrong gradient but the same compute). Reported per W: tokens/s per process, tokens/s of the run, the step time,
and the communication share 1 − t(no sync) / t(sync). The CPU numbers here share 2 cores between the processes,
so W = 2 cannot be faster than W = 1 on this machine; the point is the measurement, repeated on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch

    from tether import distributed
    from tether.data import collate_preference, load_preference_dataset
    from tether.distributed import Trainable, shard_rows
    from tether.models import load_model, load_tokenizer
    from tether.recipes.configs import PreferenceConfig
    from tether.recipes.preference import preference_step, reference_logps
    from tether.training import make_optimizer

    dist = distributed.init(args.mode, "cuda" if torch.cuda.is_available() else "cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = PreferenceConfig(model=args.model, train_file=str(ROOT / "data" / "ifeval_pairs_smollm2.jsonl"),
                           max_length=512, max_prompt_length=256, chunk_size=128, device=device)
    tok = load_tokenizer(cfg.model)
    examples, _ = load_preference_dataset(cfg.train_file, tok, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length)
    rows, _ = shard_rows(list(range(args.pairs)))
    mine = [examples[i] for i in rows]
    policy = load_model(cfg.model).to(device).train()
    ref = reference_logps(policy, mine, pad_token_id=tok.pad_token_id, batch_size=len(mine),
                          chunk_size=cfg.chunk_size).to(device)
    trainable = Trainable(policy)
    opt = make_optimizer(policy, lr=1e-7, contiguous_state=not distributed.is_sharded(policy))
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in collate_preference(mine, tok.pad_token_id).items()}
    tokens = int(batch["attention_mask"].sum())

    def step(sync: bool) -> float:
        t0 = time.perf_counter()
        with trainable.sync(sync):
            loss, _ = trainable(preference_step, batch, cfg=cfg, ref_logps=ref)
            (loss.sum() * dist.world / args.pairs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        distributed.barrier()
        return time.perf_counter() - t0

    step(True)  # warm-up (optimizer state, allocator)
    timed = {True: [], False: []}
    for _ in range(args.steps):  # interleaved: machine load hits both alike
        for sync in (True, False):
            timed[sync].append(step(sync))
    t_sync, t_local = sorted(timed[True])[len(timed[True]) // 2], sorted(timed[False])[len(timed[False]) // 2]
    total_tokens = distributed.all_sum({"t": float(tokens)})["t"]
    if dist.main:
        Path(args.out).write_text(json.dumps({
            "world": dist.world, "mode": args.mode, "pairs": args.pairs, "step_s": t_sync,
            "tokens_per_s_per_process": total_tokens / dist.world / t_sync, "tokens_per_s": total_tokens / t_sync,
            "comm_share": max(0.0, 1.0 - t_local / t_sync), "device": device}))
    distributed.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--pairs", type=int, default=8, help="global micro-batch of preference pairs")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mode", choices=("ddp", "fsdp2"), default="ddp")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            from tether.distributed import local_launch_args

            cmd = [sys.executable, "-m", "torch.distributed.run", *local_launch_args(world), __file__,
                   "--worker", "--out", str(out), "--model", args.model, "--pairs", str(args.pairs),
                   "--steps", str(args.steps), "--mode", args.mode]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            rows.append(json.loads(out.read_text()))
    base = rows[0]["tokens_per_s"]
    print(f"DPO step, {args.pairs} pairs per global micro-batch, {args.mode}, {rows[0]['device']}:")
    for r in rows:
        print(f"  W={r['world']}: step {r['step_s']:.3f}s, {r['tokens_per_s_per_process']:.0f} tok/s per process, "
              f"{r['tokens_per_s']:.0f} tok/s total ({r['tokens_per_s'] / base:.2f}x W=1), "
              f"communication {100 * r['comm_share']:.0f}% of the step")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
