"""Benchmark: one distillation step of tether vs TRL 1.16, embedded SmolLM2-135M-Instruct → derived student, CPU, fp32.

    python bench/distill_vs_trl.py          # writes bench/results/distill_vs_trl.json (~6 min on 2 cores)
    python bench/distill_vs_trl.py --steps 1 --rss-steps 0 --max-new-tokens 8 --no-write          # smoke run
    python bench/distill_vs_trl.py --compare off_policy                                            # one of the two
    python bench/distill_vs_trl.py --tether-chunk-size 128 --tether-micro-batch-size 4   # tether's memory knobs

Two comparisons, each between two implementations that get the same teacher (the embedded SmolLM2-135M-Instruct),
the same student (``tether.models.derive_student``: the teacher's layers 0, 2, …, 28, saved as a plain Hugging Face
directory that both libraries load), the same rows of ``data/ifeval_pairs_smollm2.jsonl`` in the same order
(``tether.recipes.distill.step_rows``: 8 rows per step), chat messages that both libraries render with the tokenizer's
chat template (prompt token ids are checked to be equal), AdamW at lr 1e-5 (linear schedule), gradient clipping at
1.0, fp32, the same torch thread count, no vLLM.

* ``on_policy``: the student samples one response per prompt (≤ ``--max-new-tokens`` tokens, temperature 1, no
  top-k/top-p) and is trained on the reverse KL(student ‖ teacher) at every sampled position (GKD with λ = 1; TRL's
  ``DistillationConfig`` default β = 1).
  - ``tether``: ``tether.recipes.distill.distill_step`` on the run state ``setup`` builds, for
    ``DistillConfig(mode="on_policy", lmbda=1, divergence="reverse_kl", batch_size=8, micro_batch_size=8)``: tether's
    KV-cache sampler, one teacher forward pass, the student's forward + backward with the divergence chunked over
    both LM heads (``tether.head_divergence``), clipping, AdamW, schedule.
  - ``tether_on_policy_lean`` (an extra, ``--no-extra`` drops it): the same step with the recipe's two memory fields
    set (``LEAN``: ``gradient_checkpointing=True`` as TRL's default, ``chunk_size=128``).
  - ``trl_distillation``: TRL's stable ``DistillationTrainer`` at its defaults except ``bf16=False`` and what the
    comparison fixes (``per_device_train_batch_size=8``, ``max_completion_length``, ``learning_rate``). Defaults
    that matter for cost: gradient checkpointing on, ``model.generate``, its chunked divergence
    (``ChunkedDivergenceFunction``; on CPU it projects every completion position, padding included),
    ``adamw_torch_fused``.
* ``off_policy``: the dataset's responses (``chosen``), teacher-forced; generalized JSD with β = 0.5 (GKD's default)
  at every response position, no NLL term.
  - ``tether``: ``distill_step`` for ``DistillConfig(mode="off_policy", divergence="generalized_jsd",
    divergence_args={beta: 0.5})``, with the recipe's default ``cache_teacher=True``: the teacher's final hidden
    states on the dataset responses are computed once at set-up (stored on disk, fingerprinted) and read every step
    — the teacher does not run in the step. ``tether_nocache`` (``cache_teacher=False``) runs the teacher every step.
  - ``trl_gkd``: TRL's experimental ``GKDTrainer`` with ``lmbda=0`` (no student samples: every step scores the
    dataset responses), at its defaults otherwise except ``bf16=False`` and the fixed settings: β = 0.5, gradient
    checkpointing on, full (B, T, V) logits of both models, ``DataCollatorForChatML`` on ``messages`` rows.

TRL is driven manually with the code ``Trainer.train`` runs, as in ``bench/dpo_vs_trl.py``: set-up as
``train()``/``_inner_training_loop`` do it (activation checkpointing, dataloader, ``_prepare_for_training``); per
step, the body of ``_run_epoch`` for one micro-batch (collator, ``get_batch_samples``, ``training_step``,
``_clip_grad_norm``, ``optimizer.step``, scheduler, ``zero_grad``); no logging or callbacks on either side.

Tokens: the response tokens the step trains on (tether: the step's response mask; TRL DistillationTrainer: its
``completion_mask``; GKD: its shifted labels that are not -100). On-policy samples differ between the libraries, so
the token counts differ per step: the speed ratio is a ratio of tokens per second. Off-policy, the counts are
checked to be equal and the first-step losses to agree (same starting student, same rows).

Timing: both implementations of a comparison live in ONE process; one warm-up step each, then ``--steps`` rounds,
interleaved, the starting implementation alternating. tokens/s = mean tokens per timed step / median step time. As
noise checks the JSON also holds the median of per-round ratios and the ratio of median CPU times.

Peak RSS: each implementation runs alone in a fresh child process (``--only NAME``: set-up, one warm-up step and
``--rss-steps`` more) and reports VmHWM from /proc/self/status — the peak of its whole life, model loading
included (``ru_maxrss`` would be inherited across fork + execve). TRL's children import ``datasets`` (TRL needs it);
tether's do not (~90 MiB resident).

Memory floor: one more child (``--floor``) measures what any fp32 AdamW implementation of the step holds whatever
it does — the interpreter with torch and transformers imported, plus the teacher's weights and the student's
weights, gradients and two AdamW moments counted from the loaded models — and the JSON sets each peak against it
(``memory_floor_mb``, ``peak_above_floor_mb``): 0.7 × TRL's peak is only ~160 MiB above that floor here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import _maxrss_bytes, _quiet_libraries, _rss_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = ROOT / "data" / "ifeval_pairs_smollm2.jsonl"
OUT_FILE = ROOT / "bench" / "results" / "distill_vs_trl.json"
COMPARISONS = {"on_policy": ("tether_on_policy", "trl_distillation"),
               "off_policy": ("tether_off_policy", "trl_gkd")}
EXTRA_IMPLS = {"on_policy": ("tether_on_policy_lean",), "off_policy": ("tether_off_policy_nocache",)}
IMPLS = ("tether_on_policy", "trl_distillation", "tether_off_policy", "trl_gkd", "tether_off_policy_nocache",
         "tether_on_policy_lean")
LEAN = {"gradient_checkpointing": True, "chunk_size": 128}
"""``tether_on_policy_lean``: the on-policy step with the recipe's two memory fields set as TRL's defaults hold
memory (activation checkpointing) and a 128-position head chunk."""
BATCH_SIZE = 8
MAX_LENGTH = 512
MAX_PROMPT_LENGTH = 256
LR = 1e-5
MAX_GRAD_NORM = 1.0
GKD_BETA = 0.5
SEED = 0
SCHEDULE_STEPS = 100
SETTINGS = {"max_new_tokens": 64, "tether_micro_batch_size": BATCH_SIZE, "tether_gc": False, "tether_chunk_size": 512}


def load_rows() -> list[dict]:
    return [json.loads(line) for line in DATA_FILE.read_text().splitlines() if line.strip()]


def step_rows(step: int, n_rows: int) -> list[int]:
    from tether.recipes.distill import step_rows as schedule

    return schedule(n_rows, step, BATCH_SIZE, SEED)


# ------------------------------------------------------------------------------------------------------------
# tether: the recipe's own step function
# ------------------------------------------------------------------------------------------------------------


class TetherImpl:
    def __init__(self, name: str, workdir: Path):
        from tether.recipes.configs import DistillConfig
        from tether.recipes.distill import distill_step, setup
        from tether.training import set_seed

        self.name, self.distill_step = name, distill_step
        common = dict(train_file=str(DATA_FILE), output_dir=str(workdir / name), batch_size=BATCH_SIZE,
                      micro_batch_size=SETTINGS["tether_micro_batch_size"],
                      gradient_checkpointing=SETTINGS["tether_gc"], chunk_size=SETTINGS["tether_chunk_size"],
                      max_length=MAX_LENGTH,
                      max_prompt_length=MAX_PROMPT_LENGTH, max_new_tokens=SETTINGS["max_new_tokens"],
                      temperature=1.0, lr=LR, schedule="linear", warmup_ratio=0.0, weight_decay=0.0,
                      max_grad_norm=MAX_GRAD_NORM, steps=SCHEDULE_STEPS, eval_prompts_file=None, eval_prompts=0,
                      seed=SEED, progress=False, tensorboard=False)
        if name.startswith("tether_on_policy"):
            # λ = 1: every step trains on student samples, so there are no dataset responses to cache teacher states for
            self.cfg = DistillConfig(mode="on_policy", lmbda=1.0, divergence="reverse_kl", cache_teacher=False,
                                     **{**common, **(LEAN if name == "tether_on_policy_lean" else {})})
        else:
            self.cfg = DistillConfig(mode="off_policy", divergence="generalized_jsd",
                                     divergence_args={"beta": GKD_BETA},
                                     cache_teacher=name == "tether_off_policy", **common)
        set_seed(SEED)
        Path(self.cfg.output_dir).mkdir(parents=True, exist_ok=True)  # as start_run does
        t0 = time.perf_counter()
        self.run = setup(self.cfg)  # teacher, derived student, data, (cached teacher states), optimizer
        self.setup_seconds = time.perf_counter() - t0

    def info(self) -> dict:
        c = self.cfg
        return {"mode": c.mode, "divergence": c.divergence, "divergence_args": c.divergence_args,
                "cache_teacher": c.cache_teacher and c.mode == "off_policy", "micro_batch_size": c.micro_batch_size,
                "gradient_checkpointing": c.gradient_checkpointing, "chunk_size": c.chunk_size,
                "recipe_setup_seconds": round(self.setup_seconds, 2)}

    def prompt_ids(self, rows: list[int]) -> list[list[int]]:
        return [list(self.run.prompt_ids[i]) for i in rows]

    def step(self, step: int, rows: list[int]) -> dict:
        assert rows == step_rows(step, len(self.run.prompt_ids))
        t0 = time.perf_counter()
        row = self.distill_step(self.run, step)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "generation_seconds": row["gen_s"] if self.cfg.mode == "on_policy" else 0.0,
                "tokens": int(round(row["response_len"] * len(rows))), "loss": row["loss"],
                "prompt_ids": self.prompt_ids(rows)}


# ------------------------------------------------------------------------------------------------------------
# TRL: DistillationTrainer (stable) and GKDTrainer (experimental), driven step by step
# ------------------------------------------------------------------------------------------------------------


class TRLImpl:
    def __init__(self, name: str, workdir: Path, rows: list[dict]):
        import datasets
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tether.models import derive_student, embedded_model_dir

        self.name = name
        teacher_dir, student_dir = embedded_model_dir(), derive_student(None, stride=2)
        tokenizer = AutoTokenizer.from_pretrained(student_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        shared = dict(output_dir=str(workdir / name), per_device_train_batch_size=BATCH_SIZE,
                      gradient_accumulation_steps=1, learning_rate=LR, max_grad_norm=MAX_GRAD_NORM,
                      lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_steps=SCHEDULE_STEPS,
                      report_to=[], logging_steps=10**6, save_strategy="no", use_cpu=True, bf16=False, fp16=False,
                      disable_tqdm=True, seed=SEED, dataloader_num_workers=0)
        t0 = time.perf_counter()
        if name == "trl_distillation":
            from trl import DistillationConfig, DistillationTrainer

            tokenizer.padding_side = "left"
            args = DistillationConfig(max_completion_length=SETTINGS["max_new_tokens"], temperature=1.0, top_k=0,
                                      top_p=1.0, **shared)
            assert args.beta == 1.0  # TRL's default: reverse KL
            dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]}
                                                  for r in rows])
            self.trainer = tr = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                                    train_dataset=dataset, processing_class=tokenizer)
        else:
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(lmbda=0.0, beta=GKD_BETA, max_length=MAX_LENGTH, **shared)
            dataset = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                                                {"role": "assistant", "content": r["chosen"]}]}
                                                  for r in rows])
            self.trainer = tr = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                           processing_class=tokenizer)
        self.init_seconds = time.perf_counter() - t0

        # What Trainer.train() does before its loop (transformers 5.x, one CPU process, no resume):
        tr.is_in_train = True
        if args.activation_checkpointing:  # TRL's default gradient_checkpointing=True is switched on in train()
            kw = dict(args.activation_checkpointing_kwargs or {})
            every_n, offload = kw.pop("every_n_layers", 1), kw.pop("offload", False)
            tr.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw or None,
                                                     every_n_layers=every_n, offload=offload)
        tr.accelerator.free_memory()
        dl = tr.get_train_dataloader()
        n_epochs, steps_per_epoch, *_, max_steps = tr.set_initial_training_values(args, dl)
        tr._init_training_state(max_steps, steps_per_epoch, n_epochs, None, None)
        self.model, dl = tr._prepare_for_training(max_steps, dl, None)
        self.model.zero_grad()
        self.dataset, self.collate = dl.dataset, dl.collate_fn
        self.seen: dict = {}
        self.timers = {"generation": 0.0}
        if name == "trl_distillation":
            self._wrap("_generate", "generation")
            self._wrap("_generate_and_score_completions", None)

    def _wrap(self, method: str, bucket: str | None) -> None:
        inner = getattr(self.trainer, method)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            if bucket:
                self.timers[bucket] += time.perf_counter() - t0
                self.seen["prompt_ids"] = [list(p) for p in out[0]]
            else:
                self.seen["tokens"] = int(out["completion_mask"].sum())
            return out

        setattr(self.trainer, method, timed)

    def info(self) -> dict:
        tr = self.trainer
        out = {"trainer_init_seconds": round(self.init_seconds, 2),
               "gradient_checkpointing": bool(tr.model.is_activation_checkpointing),
               "optim": str(tr.args.optim.value), "beta": tr.beta}
        if self.name == "trl_gkd":
            out.update(lmbda=tr.lmbda, seq_kd=tr.seq_kd)
        return out

    def step(self, step: int, rows: list[int]) -> dict:
        """One optimizer step: the body of Trainer._run_epoch for gradient_accumulation_steps = 1."""
        tr, model = self.trainer, self.model
        self.timers = {"generation": 0.0}
        t0 = time.perf_counter()
        inputs = self.collate([self.dataset[i] for i in rows])
        if self.name == "trl_gkd":
            labels = inputs["labels"][:, 1:]
            self.seen = {"tokens": int((labels != -100).sum()),
                         "prompt_ids": [p[m.bool()].tolist() for p, m in
                                        zip(inputs["prompts"], inputs["prompt_attention_mask"])]}
        batch_samples, num_items_in_batch = tr.get_batch_samples(iter([inputs]), 1, tr.args.device)
        tr.current_gradient_accumulation_steps = len(batch_samples)
        tr.accelerator.gradient_state._set_sync_gradients(True)
        loss = tr.training_step(model, batch_samples[0], num_items_in_batch)
        tr.current_flos += float(tr.floating_point_ops(batch_samples[0])) if isinstance(batch_samples[0], dict) \
            else 0.0
        grad_norm = tr._clip_grad_norm(model) if tr.args.max_grad_norm > 0 else None
        tr._get_grad_norm(model, grad_norm=grad_norm)
        tr.optimizer.step()
        tr._get_learning_rate()
        tr.lr_scheduler.step()
        model.zero_grad()
        tr.state.global_step += 1
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "generation_seconds": self.timers["generation"], "tokens": self.seen["tokens"],
                "loss": float(loss), "prompt_ids": self.seen["prompt_ids"]}


def make_impl(name: str, workdir: Path, rows: list[dict]):
    return TetherImpl(name, workdir) if name.startswith("tether") else TRLImpl(name, workdir, rows)


# ------------------------------------------------------------------------------------------------------------
# Modes
# ------------------------------------------------------------------------------------------------------------


def run_only(name: str, steps: int, workdir: Path) -> dict:
    """One implementation alone (for its peak RSS): set-up, warm-up step, ``steps`` steps."""
    rows = load_rows()
    t0 = time.perf_counter()
    impl = make_impl(name, workdir, rows)
    setup = {"setup_seconds": round(time.perf_counter() - t0, 2), **impl.info()}
    rss_after_setup = _rss_bytes()
    times = [impl.step(s, step_rows(s, len(rows)))["seconds"] for s in range(steps + 1)]
    return {"name": name, "steps": steps + 1, "peak_rss_bytes": _maxrss_bytes(), "rss_after_setup_bytes":
            rss_after_setup, "step_seconds": times, "setup": setup}


def _quiet_transformers() -> None:
    """``_quiet_libraries`` without importing ``datasets``, which only TRL uses (tether's peak-RSS child)."""
    import logging
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def memory_floor() -> dict:
    """What any fp32 AdamW implementation of this step must hold, measured in a fresh process: the resident memory
    of the interpreter with torch and transformers imported (VmHWM before any model exists), plus the state bytes
    counted from the loaded models — the teacher's weights and the student's weights, gradients and two AdamW
    moments (fp32, 4 bytes each). Activations, logits and sampling caches come on top of this floor."""
    import torch
    import transformers  # noqa: F401

    runtime = _maxrss_bytes()
    from transformers import AutoModelForCausalLM

    from tether.models import derive_student, embedded_model_dir

    def param_bytes(path) -> int:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return sum(p.numel() * p.element_size() for p in model.parameters())

    teacher, student = param_bytes(embedded_model_dir()), param_bytes(derive_student(None, stride=2))
    return {"runtime_bytes": runtime, "teacher_weight_bytes": teacher, "student_weight_bytes": student,
            "state_bytes": teacher + 4 * student, "floor_bytes": runtime + teacher + 4 * student}


def run_interleaved(names: list[str], steps: int, workdir: Path) -> dict:
    import gc

    rows = load_rows()
    impls, setup = {}, {}
    for name in names:
        t0 = time.perf_counter()
        impls[name] = make_impl(name, workdir, rows)
        setup[name] = {"setup_seconds": round(time.perf_counter() - t0, 2), **impls[name].info()}
        print(f"[setup] {name}: {setup[name]}", flush=True)
    records: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(steps + 1):  # round 0 = warm-up
        idx = step_rows(r, len(rows))
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            load = os.getloadavg()[0]
            c0 = time.process_time()
            rec = impls[name].step(r, idx)
            rec.update(round=r, cpu_seconds=time.process_time() - c0, loadavg_1min_before=load)
            records[name].append(rec)
            print(f"[round {r}{' warm-up' if r == 0 else ''}] {name}: {rec['seconds']:.2f}s "
                  f"(gen {rec['generation_seconds']:.2f}s, cpu {rec['cpu_seconds']:.1f}s, load {load:.1f}) "
                  f"{rec['tokens']} tok, loss {rec['loss']:.4f}", flush=True)
    del impls
    gc.collect()
    return {"setup": setup, "records": records}


def _children(jobs: dict[str, list[str]], threads: int) -> dict[str, dict]:
    results = {}
    for key, args in jobs.items():  # one at a time: peak RSS alone, and the machine's memory is shared
        cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"child {args} failed:\n{proc.stderr[-4000:]}")
        results[key] = json.loads(proc.stdout.strip().splitlines()[-1])
        mb = results[key].get("peak_rss_bytes", results[key].get("floor_bytes", 0)) / 2**20
        print(f"[child] {key}: {'peak RSS' if 'peak_rss_bytes' in results[key] else 'floor'} {mb:.0f} MB", flush=True)
    return results


def summarize(comparison: str, names: list[str], inter: dict, rss: dict, floor: dict | None = None) -> dict:
    med = statistics.median
    recs = inter["records"]
    per = {}
    for name, rs in recs.items():
        timed = [r for r in rs if r["round"] > 0]
        med_s = med(r["seconds"] for r in timed)
        per[name] = {
            "median_step_seconds": round(med_s, 4),
            "median_generation_seconds": round(med(r["generation_seconds"] for r in timed), 4),
            "median_step_cpu_seconds": round(med(r["cpu_seconds"] for r in timed), 4),
            "tokens_per_step": [r["tokens"] for r in timed],
            "tokens_per_second": round(statistics.mean(r["tokens"] for r in timed) / med_s, 2),
            "step_seconds": [round(r["seconds"], 3) for r in timed],
            "loadavg_1min_before_step": [round(r["loadavg_1min_before"], 2) for r in timed],
            "warmup": {"seconds": round(rs[0]["seconds"], 3), "tokens": rs[0]["tokens"]},
            "losses": [round(r["loss"], 6) for r in rs],
            "peak_rss_mb": round(rss[name]["peak_rss_bytes"] / 2**20, 1),
            "rss_after_setup_mb": round(rss[name]["rss_after_setup_bytes"] / 2**20, 1),
            "setup_in_timing_process": inter["setup"][name],
            "rss_child": {"setup": rss[name]["setup"], "step_seconds": [round(t, 2) for t in
                                                                        rss[name]["step_seconds"]]},
        }
    base = names[0]
    checks = {"prompt_ids_identical": all(a["prompt_ids"] == b["prompt_ids"] for n in names[1:]
                                          for a, b in zip(recs[base], recs[n]))}
    if comparison == "off_policy":
        checks["tokens_identical"] = {n: [r["tokens"] for r in recs[n]] == [r["tokens"] for r in recs[base]]
                                      for n in names[1:]}
        checks["first_step_loss_abs_diff"] = {n: abs(recs[n][0]["loss"] - recs[base][0]["loss"]) for n in names[1:]}
    ratios = {}
    for trl in (n for n in names if n.startswith("trl")):
        for tether in (n for n in names if n.startswith("tether")):
            paired = [(a["tokens"] / a["seconds"]) / (b["tokens"] / b["seconds"])
                      for a, b in zip(recs[tether], recs[trl]) if a["round"] > 0]
            ratios[f"{tether}_vs_{trl}"] = {
                "tokens_per_second_ratio": round(per[tether]["tokens_per_second"] / per[trl]["tokens_per_second"], 3),
                "check_median_of_per_round_ratios": round(med(paired), 3),
                "check_cpu_time_per_token_ratio": round(
                    (per[trl]["median_step_cpu_seconds"] / statistics.mean(per[trl]["tokens_per_step"]))
                    / (per[tether]["median_step_cpu_seconds"] / statistics.mean(per[tether]["tokens_per_step"])), 3),
                "peak_rss_ratio": round(rss[tether]["peak_rss_bytes"] / rss[trl]["peak_rss_bytes"], 3),
                "meets_speed_target_ge_1.5x": per[tether]["tokens_per_second"] >= 1.5 * per[trl]["tokens_per_second"],
                "meets_memory_target_le_0.7x": rss[tether]["peak_rss_bytes"] <= 0.7 * rss[trl]["peak_rss_bytes"],
            }
            if floor:  # the memory target against what neither side can go below
                f, mb = floor["floor_bytes"], 2**20
                ratios[f"{tether}_vs_{trl}"].update({
                    "memory_floor_mb": round(f / mb, 1),
                    "memory_target_mb": round(0.7 * rss[trl]["peak_rss_bytes"] / mb, 1),
                    "memory_target_above_floor_mb": round((0.7 * rss[trl]["peak_rss_bytes"] - f) / mb, 1),
                    "peak_above_floor_mb": {n: round((rss[n]["peak_rss_bytes"] - f) / mb, 1) for n in (tether, trl)},
                    "peak_above_floor_ratio": round((rss[tether]["peak_rss_bytes"] - f)
                                                    / (rss[trl]["peak_rss_bytes"] - f), 3)})
    return {"ratios_tether_over_trl": ratios, "checks": checks, "implementations": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", default="on_policy,off_policy", help="comma-separated: on_policy, off_policy")
    ap.add_argument("--steps", type=int, default=3, help="timed interleaved rounds (after one warm-up round)")
    ap.add_argument("--rss-steps", type=int, default=1, help="steps after the warm-up in each peak-RSS child")
    ap.add_argument("--max-new-tokens", type=int, default=SETTINGS["max_new_tokens"])
    ap.add_argument("--tether-micro-batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--tether-gc", action="store_true", help="tether with gradient checkpointing of the student")
    ap.add_argument("--tether-chunk-size", type=int, default=512, help="tether's LM-head chunk (positions)")
    ap.add_argument("--no-extra", action="store_true", help="skip tether_off_policy_nocache")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(OUT_FILE))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--only", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    SETTINGS.update(max_new_tokens=args.max_new_tokens, tether_micro_batch_size=args.tether_micro_batch_size,
                    tether_gc=args.tether_gc, tether_chunk_size=args.tether_chunk_size)
    flags = ["--max-new-tokens", str(args.max_new_tokens), "--tether-micro-batch-size",
             str(args.tether_micro_batch_size), "--tether-chunk-size", str(args.tether_chunk_size)] + (
        ["--tether-gc"] if args.tether_gc else [])
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.floor:  # before the libraries the children import for the comparison (datasets): the floor's runtime
        print(json.dumps(memory_floor()))  # is the interpreter with torch and transformers only
        return
    import torch

    if args.only and args.only.startswith("tether"):  # tether's child: no `datasets` import (~90 MiB resident)
        _quiet_transformers()
    else:
        _quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.only:
        print(json.dumps(run_only(args.only, args.rss_steps, Path(args.workdir))))
        return
    import transformers
    import trl

    from tether.models import derive_student

    derive_student(None, stride=2)  # build the cached student once, before any child needs it
    t_start = time.perf_counter()
    comparisons = [c.strip() for c in args.compare.split(",") if c.strip()]
    meta = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch_threads": threads},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "trl": trl.__version__},
            "setting": {"teacher": "SmolLM2-135M-Instruct (embedded, fp32)",
                        "student": "derive_student(stride=2): 15 of 30 layers", "device": "cpu",
                        "data": str(DATA_FILE.relative_to(ROOT)), "batch_size": BATCH_SIZE, "lr": LR,
                        "max_grad_norm": MAX_GRAD_NORM, "max_length": MAX_LENGTH, "timed_steps": args.steps,
                        "warmup_steps": 1, **SETTINGS, "gkd_beta": GKD_BETA}}
    print(f"[meta] {json.dumps(meta)}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="tether-distill-bench-")
    workdir = Path(tmp.name)
    result: dict = {"meta": meta, "targets": {"tokens_per_second_ratio": ">= 1.5", "peak_rss_ratio": "<= 0.7"}}
    floor = _children({"memory_floor": ["--floor"]}, threads)["memory_floor"]
    result["memory_floor_mb"] = {k.removesuffix("_bytes"): round(v / 2**20, 1) for k, v in floor.items()}
    for comparison in comparisons:
        names = list(COMPARISONS[comparison]) + ([] if args.no_extra else list(EXTRA_IMPLS.get(comparison, ())))
        t0 = time.perf_counter()
        rss = _children({n: ["--only", n, "--rss-steps", str(args.rss_steps), "--workdir", str(workdir), *flags]
                         for n in names}, threads)
        t1 = time.perf_counter()
        inter = run_interleaved(names, args.steps, workdir)
        result[comparison] = summarize(comparison, names, inter, rss, floor)
        result[comparison]["wall_seconds"] = {"rss_children": round(t1 - t0, 1),
                                              "interleaved": round(time.perf_counter() - t1, 1)}
        print(json.dumps({comparison: {"ratios": result[comparison]["ratios_tether_over_trl"],
                                       "checks": result[comparison]["checks"]}}, indent=2), flush=True)
    tmp.cleanup()
    meta["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    if not args.no_write:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
