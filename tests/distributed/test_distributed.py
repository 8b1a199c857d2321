"""Two gloo processes on the CPU (``torchrun --nproc_per_node 2``, meeting at 127.0.0.1) against one process.

DPO, GRPO (one on-policy update per rollout, and off-policy: 2 PPO epochs × 2 mini-batches) and distillation
(off-policy forward KL; on-policy GKD) are trained with
``distributed: ddp`` and ``distributed: fsdp2`` on two processes and, in this process, with ``distributed: none``.
The two-process runs deal each micro-batch's pairs / groups to the ranks; the one-process run holds them all in
one micro-batch (DPO: ``batch_size`` 2 per micro-batch; two processes get 1 pair each) — the equivalent gradient
accumulation. Per step the loss, the gradient norm and (GRPO) the exact token KL must agree, and so must the final
weights. All runs share one torchrun launch (one process start-up, several trainings).

Tolerances (fp32). The runs compute the same sums in another order: per-rank partial sums joined by an all-reduce,
and the one-process path adds the embedding gradient in place (``tether.logprobs``) where the wrapped path goes
through autograd. Each reordered fp32 sum differs by a few ulps (relative ~1e-7); over 3 steps AdamW turns a
gradient difference into an update difference of at most lr × (relative difference of m/√v), so with lr ≤ 3e-3 the
weights differ by ~1e-6 (measured: 1.7e-6 DPO, 1.9e-6 GRPO). Asserted: losses and KLs to atol 1e-6 + rtol 1e-4,
gradient norms to rtol 1e-5, weights to atol 2e-5 — an order of magnitude above that noise and three orders below
what an unsynchronized gradient produces (the bypass test: each rank steps on half the batch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.checkpoints import latest_checkpoint
from tether.distributed import local_launch_args
from tether.training import read_metrics

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

WORKER = Path(__file__).with_name("worker.py")
ROWS = [{"prompt": f"Question {i}: name a {w}.", "chosen": f"A fine {w}, number {i}." + " Really." * (i % 3),
         "rejected": "no " * (1 + i % 4) + w}
        for i, w in enumerate(["cat", "dog", "tree", "river", "cloud", "stone", "bird", "lamp", "road", "song"])]
QUIET = dict(tensorboard=False, progress=False)
DPO = dict(max_length=256, max_prompt_length=128, lr=1e-3, max_steps=3, batch_size=2, grad_accum=2, epochs=2,
           **QUIET)
RL = dict(steps=3, prompts_per_step=4, group_size=4, max_new_tokens=10, train_prompts=8, eval_prompts=0, lr=3e-3,
          micro_batch_size=8, sample_batch_size=8, **QUIET)
RL_OFF = dict(RL, ppo_epochs=2, mini_batches=2)
DISTILL = dict(steps=3, batch_size=4, micro_batch_size=2, max_new_tokens=6, eval_prompts_file=None, eval_prompts=0,
               lr=1e-3, chunk_size=7, **QUIET)
DISTILL_MODES = {"distill": dict(mode="off_policy"), "distill-gkd": dict(mode="on_policy", lmbda=1.0)}
MODES = ("ddp", "fsdp2")


def torchrun(specs: list[dict], path: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``specs`` (see worker.py) in 2 gloo processes; the output is shown when ``check`` fails."""
    path.write_text(json.dumps(specs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *local_launch_args(2), str(WORKER),
                           str(path)], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def close(a: float, b: float, *, atol: float, rtol: float) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def assert_same_run(run: Path, ref: Path, keys: tuple[str, ...]) -> None:
    """Per step: losses / KLs to atol 1e-6 + rtol 1e-4 and gradient norms to rtol 1e-5 (module docstring); the
    final weights to atol 2e-5."""
    got, want = read_metrics(run), read_metrics(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want], (run, got, want)
    for g, w in zip(got, want):
        for k in keys:
            tol = dict(atol=0.0, rtol=1e-5) if k == "grad_norm" else dict(atol=1e-6, rtol=1e-4)
            assert close(g[k], w[k], **tol), f"{run} step {g['step']}: {k} {g[k]!r} vs one process {w[k]!r}"
    a, b = load_file(run / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    for name, tensor in b.items():
        diff = float((a[name] - tensor).abs().max())
        assert diff <= 2e-5, f"{run}: final weight {name} differs from one process's by {diff:.3g}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tether.testing import make_tiny_model_dir

    root = tmp_path_factory.mktemp("dist")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"root": root, "model": str(make_tiny_model_dir(root / "m0", seed=0)), "pairs": str(pairs),
            "student": str(make_tiny_model_dir(root / "m1", seed=1))}


def _dpo(assets, name: str, **extra) -> dict:
    return dict(model=assets["model"], train_file=assets["pairs"], output_dir=str(assets["root"] / name), **DPO,
                **extra)


def _distill(assets, kind: str, suffix: str, **extra) -> dict:
    """Distillation ``kind`` (a key of DISTILL_MODES): teacher m0, an independent tiny student m1."""
    return dict(teacher_model=assets["model"], model=assets["student"], train_file=assets["pairs"],
                output_dir=str(assets["root"] / f"{kind}-{suffix}"), **DISTILL, **DISTILL_MODES[kind], **extra)


def _rl(assets, name: str, base: dict, **extra) -> dict:
    return dict(model=assets["model"], output_dir=str(assets["root"] / name), **base, **extra)


@pytest.fixture(scope="module")
def runs(assets):
    """One process (here) and the two-process runs (one torchrun launch): DPO and GRPO on- and off-policy under
    DDP and FSDP2, and DPO with the loss computed outside the wrapper."""
    from tether.recipes.configs import DistillConfig, PreferenceConfig, RLConfig
    from tether.recipes.distill import train as distill_train
    from tether.recipes.online_rl import train as rl_train
    from tether.recipes.preference import train as dpo_train

    sys.path.insert(0, str(WORKER.parent))
    from worker import vowel_share

    dpo_train(PreferenceConfig(**_dpo(assets, "dpo-one")))
    rl_train(RLConfig(**_rl(assets, "rl-one", RL)), reward=vowel_share)
    rl_train(RLConfig(**_rl(assets, "rl-off-one", RL_OFF)), reward=vowel_share)
    for kind in DISTILL_MODES:
        distill_train(DistillConfig(**_distill(assets, kind, "one")))
    specs = []
    for mode in MODES:
        specs += [{"recipe": "dpo", "config": _dpo(assets, f"dpo-{mode}", distributed=mode)},
                  {"recipe": "rl", "config": _rl(assets, f"rl-{mode}", RL, distributed=mode)},
                  {"recipe": "rl", "config": _rl(assets, f"rl-off-{mode}", RL_OFF, distributed=mode)}]
        specs += [{"recipe": "distill", "config": _distill(assets, kind, mode, distributed=mode)}
                  for kind in DISTILL_MODES]
    specs.append({"recipe": "dpo", "config": _dpo(assets, "dpo-bypass", distributed="ddp"), "bypass": True})
    torchrun(specs, assets["root"] / "specs.json")
    return assets["root"]


@pytest.mark.parametrize("mode", MODES)
def test_dpo_two_processes_equal_one(runs, mode):
    """Per-pair metrics agree (``logratio`` is a token mean within each micro-batch, averaged over micro-batches by
    pairs: it depends on how the pairs are split, so it is not compared)."""
    assert_same_run(runs / f"dpo-{mode}", runs / "dpo-one", ("loss", "grad_norm", "margin", "accuracy",
                                                             "chosen_logps"))
    assert [r["tokens"] for r in read_metrics(runs / f"dpo-{mode}")] == [r["tokens"] for r in
                                                                        read_metrics(runs / "dpo-one")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("run", ["rl", "rl-off"])
def test_grpo_two_processes_equal_one(runs, run, mode):
    """GRPO: same samples (sampling batches dealt to ranks with their own RNG streams), rewards, exact token KL of
    the sampling policy, loss and gradient norm per step, on-policy and with off-policy mini-batches."""
    assert_same_run(runs / f"{run}-{mode}", runs / f"{run}-one", ("loss", "grad_norm", "token_kl", "reward",
                                                                  "entropy"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(DISTILL_MODES))
def test_distill_two_processes_equal_one(runs, kind, mode):
    """Distillation, forward KL on the dataset's responses (off-policy) and on the student's own samples (GKD,
    lmbda 1; every rank draws the step's samples with the same seed): per step loss, divergence and gradient norm,
    and the final weights."""
    assert_same_run(runs / f"{kind}-{mode}", runs / f"{kind}-one", ("loss", "grad_norm", "divergence"))


def test_loss_outside_the_wrapper_is_caught(runs):
    """The backbone called directly (not through the DDP wrapper's forward): DDP never reduces the gradients, each
    rank steps on its own pair — the comparison with one process fails on the gradient norm at step 1."""
    with pytest.raises(AssertionError, match="grad_norm"):
        assert_same_run(runs / "dpo-bypass", runs / "dpo-one", ("loss", "grad_norm"))


def test_rank_zero_alone_writes(runs):
    """One metrics file and one final model, written by rank 0; the final model of a 2-process FSDP2 run loads in
    one process (tied head included)."""
    from tether.models import load_model

    run = runs / "dpo-fsdp2"
    assert len(read_metrics(run)) == 3 and (run / "tether_config.yaml").is_file()
    model = load_model(str(run / "final"))
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_kill_one_rank_then_resume(assets, runs):
    """FSDP2, checkpoint every step: rank 1 is killed right after step-2 is written; the resumed run (same world
    size) finishes with exactly the metrics and weights of the uninterrupted run (fsdp2, same checkpoints)."""
    cfg = _dpo(assets, "dpo-killed", distributed="fsdp2", save_every=1)
    died = torchrun([{"recipe": "dpo", "config": cfg, "kill": {"rank": 1, "step": 2}}],
                    assets["root"] / "kill.json", check=False)
    assert died.returncode != 0
    assert latest_checkpoint(cfg["output_dir"]).name == "step-2"
    torchrun([{"recipe": "dpo", "config": dict(cfg, resume=True)}], assets["root"] / "resume.json")
    got, want = read_metrics(Path(cfg["output_dir"])), read_metrics(runs / "dpo-fsdp2")
    assert got == want
    a = load_file(Path(cfg["output_dir"]) / "final" / "model.safetensors")
    b = load_file(runs / "dpo-fsdp2" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
