#!/usr/bin/env bash
# The distributed path on a lent GPU machine: torchrun with world size 1 on NCCL (DDP and FSDP2), the preference
# (DPO) and online-RL (GRPO) recipes at tiny scale, compared with the same runs on the CPU (gloo) in this script.
#
#   bash bench/gpu_distributed_check.sh [OUT_DIR]        # ~2 minutes; needs one CUDA GPU, no network
#
# What it checks, per recipe and wrapper: the run finishes on cuda; step 1 (same starting weights, same batch) has
# the CPU run's loss to 1e-5 and gradient norm to rtol 1e-4 (fp32 on both; CUDA's fp32 matmuls reduce in another
# order, TF32 is off for matmuls by default); later steps are printed, not asserted (RL samples can differ once the
# probabilities differ in the last bits). Exit status 1 when a check fails. vLLM is not exercised (not installable
# on that machine).
set -euo pipefail
OUT=${1:-${OUT:-runs/gpu_distributed_check}}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
import torch
from tether.testing import make_tiny_model_dir
out = Path(sys.argv[1])
assert torch.cuda.is_available(), "no CUDA device: this check is for the lent GPU machine"
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
make_tiny_model_dir(out / "tiny", seed=0)
rows = [{"prompt": f"Question {i}: name a {w}.", "chosen": f"A fine {w}, number {i}.", "rejected": "no " * (1 + i % 4) + w}
        for i, w in enumerate(["cat", "dog", "tree", "river", "cloud", "stone", "bird", "lamp"])]
(out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
EOF
DPO="--model $OUT/tiny --train_file $OUT/pairs.jsonl --max_steps 3 --batch_size 4 --lr 1e-3 --no_progress --no_tensorboard"
RL="--model $OUT/tiny --steps 3 --prompts_per_step 4 --group_size 4 --max_new_tokens 10 --train_prompts 8 --eval_prompts 0 --lr 3e-3 --no_progress --no_tensorboard"
for mode in ddp fsdp2; do
  for device in cpu cuda; do
    torchrun --nnodes 1 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29511 -m tether dpo $DPO --distributed $mode --device $device --output_dir "$OUT/dpo-$mode-$device"
    torchrun --nnodes 1 --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29511 -m tether rl $RL --distributed $mode --device $device --output_dir "$OUT/rl-$mode-$device"
  done
done
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out, failed = Path(sys.argv[1]), False
for run in ("dpo-ddp", "dpo-fsdp2", "rl-ddp", "rl-fsdp2"):
    rows = {d: [json.loads(l) for l in (out / f"{run}-{d}" / "metrics.jsonl").read_text().splitlines() if l.strip()]
            for d in ("cpu", "cuda")}
    for cpu, gpu in zip(rows["cpu"], rows["cuda"]):
        keys = [k for k in ("loss", "grad_norm", "token_kl", "reward") if k in cpu]
        print(run, "step", cpu["step"], "  ".join(f"{k} cpu {cpu[k]:.8g} cuda {gpu[k]:.8g}" for k in keys))
    c, g = rows["cpu"][0], rows["cuda"][0]
    ok = abs(c["loss"] - g["loss"]) <= 1e-5 and abs(c["grad_norm"] - g["grad_norm"]) <= 1e-4 * abs(c["grad_norm"]) + 1e-7
    print(run, "step 1 matches the CPU run" if ok else "STEP 1 DIFFERS FROM THE CPU RUN")
    failed |= not ok
(out / "summary.txt").write_text("FAILED\n" if failed else "OK\n")
sys.exit(1 if failed else 0)
EOF
