"""Benchmark: one DPO optimizer step of tether vs TRL's DPOTrainer, embedded SmolLM2-135M-Instruct, CPU, fp32.

    python bench/dpo_vs_trl.py            # writes bench/results/dpo_vs_trl.json (5-6 min on 2 shared cores)
    python bench/dpo_vs_trl.py --steps 1 --rss-steps 0 --no-write                     # smoke run
    python bench/dpo_vs_trl.py --impls tether,trl_precompute_nogc --out other.json   # another TRL setting

Identical for every implementation: the same 32 preference pairs (conversational rows; both libraries apply the
tokenizer's chat template; ``data/ifeval_pairs_smollm2.jsonl`` when it exists, else generated), 4 pairs per
optimizer step, every sequence (prompt + one completion) cut to 128 tokens, the same batches in the same order,
AdamW at lr 5e-6 (linear schedule), β = 0.1, gradient clipping at 1.0, fp32, the same torch thread count.

* ``tether``: what ``tether.recipes.preference.train`` does, for DPO without LoRA. Before the loop: the starting
  policy scores the reference log-probs once (``_cached_reference``, the recipe's on-disk cache). Per optimizer
  step (grad_accum = 1): ``collate_preference`` → ``preference_step`` with the cached reference log-probs →
  backward of the pair-mean loss → ``clip_grad_norm_`` → AdamW (``make_optimizer``) → scheduler → ``zero_grad``.
* ``trl_default``: ``DPOTrainer`` with its defaults as users run it — reference model run every step, gradient
  checkpointing on, ``adamw_torch_fused`` — except ``bf16=False`` (TRL defaults to bf16; everyone runs fp32).
* ``trl_precompute``: the same plus ``precompute_ref_log_probs=True`` (reference log-probs computed once).
* ``trl_precompute_nogc`` (only with ``--impls``): plus ``gradient_checkpointing=False``, the TRL setting
  closest to tether's (no activation checkpointing of the backbone).

TRL is driven manually with the code ``Trainer.train`` runs. Set-up: gradient checkpointing as ``train()``
enables it, then ``_inner_training_loop``'s ``get_train_dataloader`` / ``set_initial_training_values`` /
``_init_training_state`` / ``_prepare_for_training`` (optimizer, ``accelerator.prepare``, scheduler). Per step,
the body of ``_run_epoch`` for one micro-batch: the trainer's own collator on the chosen rows,
``get_batch_samples``, ``training_step`` (forward, reference forward, backward), flop/token accounting,
``_clip_grad_norm``, ``optimizer.step()``, ``lr_scheduler.step()``, ``model.zero_grad()``. Left out, for both
libraries: per-step logging and callbacks (tether's metrics.jsonl line, TRL's callback handler).

Timing: all implementations live in ONE process. After one warm-up step each, they run INTERLEAVED: round r runs
one step of every implementation on the same batch, the starting implementation rotating each round. The
throughput ratio comes from the MEDIAN per-step wall times; tokens per step = non-pad tokens of the
(chosen + rejected) batch, counted the same way for both and checked to be equal. As noise checks, the JSON also
holds the median of the per-round ratios (steps adjacent in time) and the ratio of median per-step CPU times.

Peak RSS: each implementation runs alone in a child process (``--only NAME``: set-up, one warm-up step and
``--rss-steps`` more steps) and reports the peak RSS of its whole life, model loading and reference pass
included: VmHWM from /proc/self/status on Linux, because ``getrusage(RUSAGE_SELF).ru_maxrss`` survives
fork + execve and would report the parent's peak in every child. The children run first and share a work
directory with the timing process, so each one-time reference pass is cached on disk (tether's recipe cache,
TRL's datasets cache) and not recomputed by the timing process.

Log-prob memory: ``tether.logprobs.token_stats`` (chunked, chunk_size 512 as in the recipe) vs the plain path
(full logits from ``F.linear`` + ``token_stats_plain``), random hidden states (8 × 128 × 576) and a random
(49152, 576) head, forward + backward of the summed log-probs, each in its own child process: peak RSS minus
the RSS just before the computation. Every position labelled (the chunked path's worst case) and, for the
chunked path, half of each row labelled (as in a DPO batch, where prompt positions carry no label and are
skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = ROOT / "data" / "ifeval_pairs_smollm2.jsonl"
OUT_FILE = ROOT / "bench" / "results" / "dpo_vs_trl.json"
TRL_VARIANTS = {
    # name: DPOConfig overrides on top of the shared settings
    "trl_default": {},
    "trl_precompute": {"precompute_ref_log_probs": True},
    "trl_precompute_nogc": {"precompute_ref_log_probs": True, "gradient_checkpointing": False},
}
IMPLS = ("tether", *TRL_VARIANTS)
TETHER_OPTIONS: dict = {}  # PreferenceConfig fields set by --tether-gc / --tether-chunk-size
DEFAULT_IMPLS = "tether,trl_default,trl_precompute"
LOGPROB_RUNS = (("chunked", "chunked", 1.0), ("plain", "plain", 1.0), ("chunked_half_labelled", "chunked", 0.5))

N_PAIRS = 32
BATCH_SIZE = 4
MAX_LENGTH = 128
MAX_PROMPT_LENGTH = 96  # tether rejects (never cuts) longer prompts; the generated prompts are ~45-75 tokens
LR = 5e-6
BETA = 0.1
MAX_GRAD_NORM = 1.0
SEED = 0
# Length of the linear lr schedule (and TRL's max_steps), the same in every process: TRL's on-disk caches are keyed
# by a hash of its DPOConfig, so children and the timing process must build identical configs.
SCHEDULE_STEPS = 100


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------

_SENTENCES = [
    "Start by writing down exactly what you want to get done today, in small steps you can finish.",
    "Keep your phone in another room so that notifications do not pull your attention away.",
    "Work in blocks of twenty-five minutes and take a short break after each block.",
    "Drink a glass of water and stretch for a minute before you begin.",
    "If you feel stuck, explain the problem out loud as if you were teaching a friend.",
    "A short walk outside often helps more than another cup of coffee.",
    "Review what you did at the end of the day and note one thing to improve tomorrow.",
    "Prepare everything you need the night before so the morning starts calmly.",
    "Ask for feedback early instead of waiting until the work is finished.",
    "Practice in front of a mirror or record yourself to hear how you sound.",
    "Breathe slowly through your nose for a few seconds when you feel nervous.",
    "Choose one main idea and support it with two or three clear examples.",
    "Sleep matters: most people think and learn better after a full night of rest.",
    "Cook simple meals in larger batches and keep leftovers for busy days.",
    "Set a budget for the week and write down every purchase, even small ones.",
    "Be kind to yourself when a plan fails; adjust it and try again the next day.",
    "Read the question twice before answering so that you do not miss any detail.",
    "Celebrate small wins, because progress is easier to keep when you can see it.",
    "Turn off the television while you eat and pay attention to your food.",
    "Write a short list of questions before the meeting so you do not forget them.",
]
_OFF_TOPIC = [
    "I am not sure what you mean, but here is something else.",
    "Honestly, it depends, and there is no single answer to that.",
    "Many people have different opinions about this topic, so you should decide for yourself.",
    "The weather was nice yesterday and the park was full of people walking their dogs.",
    "There are many things to consider, such as time, money, energy, and mood, among others.",
    "As an AI, I can tell you that this is a common question that many people ask.",
]


def make_rows(n: int = N_PAIRS, seed: int = SEED) -> list[dict]:
    """Conversational preference rows. Uses data/ifeval_pairs_smollm2.jsonl when it exists, else generates ``n``
    pairs: IFEval-style prompts from ``tether.tasks``; chosen = on-topic advice that follows the stated rules,
    rejected = a vaguer answer that ignores them. Completion lengths vary from ~20 to ~130 tokens, so some
    sequences exceed 128 tokens and are truncated (the same way by both libraries)."""
    if DATA_FILE.exists():
        rows = [json.loads(line) for line in DATA_FILE.read_text().splitlines() if line.strip()][:n]
        return [_as_conversational(r) for r in rows]
    from tether.tasks import make_instruction_prompts

    rng = random.Random(seed)
    rows = []
    for p in make_instruction_prompts(n, seed, split="train"):
        k_good, k_bad = rng.randint(2, 7), rng.randint(1, 6)
        good = " ".join(rng.sample(_SENTENCES, k_good))
        bad = " ".join(rng.sample(_OFF_TOPIC, min(k_bad, len(_OFF_TOPIC))) + rng.sample(_SENTENCES, max(0, k_bad - 4)))
        for c in p["constraints"]:
            if c["type"] == "lowercase":
                good = good.lower()
            elif c["type"] == "include_keyword":
                good = f"{good} Remember, a {c['word']} can help too."
            elif c["type"] == "end_with":
                good = f"{good} {c['phrase']}"
            elif c["type"] == "start_with":
                good = f"{c['phrase']} {good}"
            elif c["type"] == "no_commas":
                good = good.replace(",", "")
            elif c["type"] == "max_words":
                good = " ".join(good.split()[: max(5, int(c.get("limit", c.get("n", 40))) - 1)])
        rows.append({"prompt": [{"role": "user", "content": p["prompt"]}],
                     "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}]})
    return rows


def _as_conversational(row: dict) -> dict:
    if isinstance(row["prompt"], list):
        return {k: row[k] for k in ("prompt", "chosen", "rejected")}
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def batch_indices(n_steps: int, n_examples: int) -> list[list[int]]:
    """The batches of the run (same for every implementation): seeded permutations cut into BATCH_SIZE pieces."""
    out = []
    epoch = 0
    while len(out) < n_steps:
        perm = list(range(n_examples))
        random.Random(SEED * 1000 + epoch).shuffle(perm)
        out += [perm[i:i + BATCH_SIZE] for i in range(0, n_examples - BATCH_SIZE + 1, BATCH_SIZE)]
        epoch += 1
    return out[:n_steps]


# ------------------------------------------------------------------------------------------------------------
# Implementations: setup() then step(indices) -> dict(seconds, tokens, loss, opt_seconds)
# ------------------------------------------------------------------------------------------------------------


class TetherImpl:
    name = "tether"

    def __init__(self, rows: list[dict], workdir: Path, total_steps: int):
        import torch

        from tether.data import collate_preference, load_preference_dataset
        from tether.models import enable_gradient_checkpointing, load_model, load_tokenizer
        from tether.recipes.preference import PreferenceConfig, _cached_reference, preference_step
        from tether.training import make_optimizer, make_scheduler, release_freed_memory, set_seed

        self.torch, self.collate, self.preference_step = torch, collate_preference, preference_step
        self.release_freed_memory = release_freed_memory
        path = _write_rows(rows, workdir)
        out_dir = workdir / "tether_run"
        self.cfg = PreferenceConfig(train_file=str(path), output_dir=str(out_dir), loss="dpo",
                                    beta=BETA, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                                    batch_size=BATCH_SIZE, lr=LR, schedule="linear", warmup_ratio=0.0,
                                    max_grad_norm=MAX_GRAD_NORM, progress=False, tensorboard=False, seed=SEED,
                                    **TETHER_OPTIONS)
        # What tether.recipes.preference.train does before its loop (steps 1-4) for DPO without LoRA: the starting
        # policy itself scores the cached reference log-probs before its first update (no reference copy).
        set_seed(SEED)
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.policy = load_model(self.cfg.model)
        if self.cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        self.policy.train()
        self.examples, self.report = load_preference_dataset(
            path, self.tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
            use_chat_template=True, on_error="raise", truncation="truncate")
        assert [ex.index for ex in self.examples] == list(range(len(rows))), self.report.summary()
        cache = out_dir / "reference_logps.safetensors"
        self.reference_cached = cache.exists()
        t0 = time.perf_counter()
        # the recipe's own cache: one no-grad pass of the reference, stored on disk (reused when it exists)
        self.ref_logps, _ = _cached_reference(self.cfg, self.examples, self.policy, self.tokenizer, out_dir,
                                              need_kl_pairs=False)
        self.ref_seconds = time.perf_counter() - t0
        self.optimizer = make_optimizer(self.policy, lr=LR, weight_decay=0.0)
        self.scheduler = make_scheduler(self.optimizer, schedule="linear", warmup_steps=0, total_steps=total_steps)

    def info(self) -> dict:
        return {"reference_pass_seconds": round(self.ref_seconds, 2),
                "reference_logps_from_disk_cache": self.reference_cached,
                "data_report": self.report.summary().split(": ", 1)[1]}

    def step(self, idx: list[int]) -> dict:
        """One optimizer step, as in the recipe's loop (grad_accum = 1)."""
        torch = self.torch
        t0 = time.perf_counter()
        batch = self.collate([self.examples[i] for i in idx], self.tokenizer.pad_token_id)
        loss, metrics = self.preference_step(self.policy, batch, cfg=self.cfg, ref_logps=self.ref_logps[idx])
        self.release_freed_memory()  # as the recipe does before each backward
        (loss.sum() / len(idx)).backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), MAX_GRAD_NORM)
        t1 = time.perf_counter()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        return {"seconds": t2 - t0, "opt_seconds": t2 - t1, "tokens": int(batch["attention_mask"].sum()),
                "loss": metrics["loss"]}


class TRLImpl:
    def __init__(self, name: str, rows: list[dict], workdir: Path, total_steps: int):
        import datasets
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        from tether.models import embedded_model_dir

        self.name, self.torch = name, torch
        model_dir = embedded_model_dir()  # the same fp32 safetensors directory tether loads
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        args = DPOConfig(
            output_dir=str(workdir / name), per_device_train_batch_size=BATCH_SIZE, max_length=MAX_LENGTH,
            learning_rate=LR, beta=BETA, max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="linear", warmup_steps=0,
            weight_decay=0.0, max_steps=total_steps, report_to=[], logging_steps=10**6, save_strategy="no",
            use_cpu=True, bf16=False, fp16=False, disable_tqdm=True, seed=SEED, dataloader_num_workers=0,
            **TRL_VARIANTS[name])
        # A file-backed dataset (as users load one), so datasets caches TRL's tokenization and precomputed
        # reference log-probs on disk, like tether's recipe caches its reference log-probs.
        dataset = datasets.load_dataset("json", data_files=str(_write_rows(rows, workdir)), split="train",
                                        cache_dir=str(workdir / "hf_datasets"))
        t0 = time.perf_counter()  # tokenization and, for the precompute variants, the reference pass
        self.trainer = tr = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        self.init_seconds = time.perf_counter() - t0
        assert len(tr.train_dataset) == len(rows), "TRL dropped rows"

        # What Trainer.train() does before its loop (transformers 5.24, one CPU process, no resume):
        tr.is_in_train = True
        if args.activation_checkpointing:  # TRL's default gradient_checkpointing=True is switched on in train()
            kw = dict(args.activation_checkpointing_kwargs or {})
            every_n, offload = kw.pop("every_n_layers", 1), kw.pop("offload", False)
            tr.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw or None,
                                                     every_n_layers=every_n, offload=offload)
        tr.accelerator.free_memory()  # Trainer._inner_training_loop from here
        dl = tr.get_train_dataloader()
        n_epochs, steps_per_epoch, *_, max_steps = tr.set_initial_training_values(args, dl)
        tr._init_training_state(max_steps, steps_per_epoch, n_epochs, None, None)
        self.model, dl = tr._prepare_for_training(max_steps, dl, None)  # optimizer, accelerator.prepare, scheduler
        self.model.zero_grad()
        # the loop's batches are the trainer's own collation of the rows chosen by batch_indices()
        self.dataset, self.collate = dl.dataset, dl.collate_fn

    def info(self) -> dict:
        tr = self.trainer
        return {"trainer_init_seconds": round(self.init_seconds, 2),
                "gradient_checkpointing": bool(tr.model.is_activation_checkpointing),
                "precompute_ref_log_probs": bool(tr.args.precompute_ref_log_probs),
                "reference_model_in_memory": tr.ref_model is not None, "optim": str(tr.args.optim.value)}

    def step(self, idx: list[int]) -> dict:
        """One optimizer step: the body of Trainer._run_epoch for gradient_accumulation_steps = 1, without the
        callbacks and the logging (logging_steps is never reached)."""
        tr, model = self.trainer, self.model
        t0 = time.perf_counter()
        inputs = self.collate([self.dataset[i] for i in idx])
        tokens = int(inputs["attention_mask"].sum())
        batch_samples, num_items_in_batch = tr.get_batch_samples(iter([inputs]), 1, tr.args.device)
        tr.current_gradient_accumulation_steps = len(batch_samples)
        tr.accelerator.gradient_state._set_sync_gradients(True)
        loss = tr.training_step(model, batch_samples[0], num_items_in_batch)  # forward (+ reference) + backward
        tr.current_flos += float(tr.floating_point_ops(inputs))
        tr._track_num_input_tokens(inputs)
        grad_norm = tr._clip_grad_norm(model) if tr.args.max_grad_norm > 0 else None
        tr._get_grad_norm(model, grad_norm=grad_norm)
        t1 = time.perf_counter()
        tr.optimizer.step()
        tr._get_learning_rate()
        tr.lr_scheduler.step()
        model.zero_grad()
        tr.state.global_step += 1
        t2 = time.perf_counter()
        return {"seconds": t2 - t0, "opt_seconds": t2 - t1, "tokens": tokens, "loss": float(loss)}


def _write_rows(rows: list[dict], workdir: Path) -> Path:
    path = workdir / "pairs.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:  # atomically: concurrent children share the work dir
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def make_impl(name: str, rows, workdir: Path, total_steps: int):
    return TetherImpl(rows, workdir, total_steps) if name == "tether" else TRLImpl(name, rows, workdir, total_steps)


# ------------------------------------------------------------------------------------------------------------
# Modes
# ------------------------------------------------------------------------------------------------------------


def run_interleaved(names: list[str], steps: int, workdir: Path) -> dict:
    """All implementations in this process; warm-up step each, then `steps` interleaved rounds."""
    rows = make_rows()
    batches = batch_indices(steps + 1, len(rows))
    impls = {}
    setup = {}
    for name in names:
        t0 = time.perf_counter()
        impls[name] = make_impl(name, rows, workdir, total_steps=SCHEDULE_STEPS)
        setup[name] = {"setup_seconds": round(time.perf_counter() - t0, 2), **impls[name].info()}
        print(f"[setup] {name}: {setup[name]}", flush=True)
    records = {name: [] for name in names}
    for r, idx in enumerate(batches):  # round 0 = warm-up
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            load = os.getloadavg()[0]
            c0 = time.process_time()
            rec = impls[name].step(idx)
            rec.update(round=r, cpu_seconds=time.process_time() - c0, loadavg_1min_before=load)
            records[name].append(rec)
            print(f"[round {r}{' warm-up' if r == 0 else ''}] {name}: {rec['seconds']:.2f}s "
                  f"(cpu {rec['cpu_seconds']:.1f}s, load {load:.1f}) {rec['tokens']} tok loss {rec['loss']:.4f}",
                  flush=True)
    return {"setup": setup, "records": records}


def run_only(name: str, steps: int, workdir: Path) -> dict:
    """One implementation alone (for its peak RSS): set-up, warm-up step, `steps` steps."""
    rows = make_rows()
    batches = batch_indices(steps + 1, len(rows))
    t0 = time.perf_counter()
    impl = make_impl(name, rows, workdir, total_steps=SCHEDULE_STEPS)
    setup = {"setup_seconds": round(time.perf_counter() - t0, 2), **impl.info()}
    rss_after_setup = _rss_bytes()
    times = [impl.step(idx)["seconds"] for idx in batches]
    return {"name": name, "steps": steps + 1, "peak_rss_bytes": _maxrss_bytes(),
            "rss_after_setup_bytes": rss_after_setup, "step_seconds": times, "setup": setup}


def run_logprob_mem(path: str, label_frac: float = 1.0, batch: int = 8, length: int = 128, hidden: int = 576,
                    vocab: int = 49152) -> dict:
    """Peak memory of summed log-probs, forward + backward, chunked (tether) vs plain full logits.

    ``label_frac`` < 1 marks only the last fraction of every row as labelled (response tokens), the rest ignored
    (prompt), as in a DPO batch: the chunked path skips unlabelled positions, the plain path cannot."""
    import torch
    import torch.nn.functional as F

    from tether.logprobs import token_stats, token_stats_plain

    def compute(h, w, y):
        if path == "chunked":
            lp = token_stats(h, w, y, chunk_size=512)["logps"]
        else:
            lp = token_stats_plain(F.linear(h, w), y)["logps"]
        lp.sum().backward()

    torch.manual_seed(SEED)
    # warm up kernels on a small problem (its memory is negligible next to the real one)
    hs = torch.empty(1, 8, hidden).normal_().requires_grad_()
    ws = torch.empty(64, hidden).normal_(0, 0.02).requires_grad_()
    compute(hs, ws, torch.randint(0, 64, (1, 8)))
    # tensors created in place, so no temporary raises the high-water mark before the measurement
    h = torch.empty(batch, length, hidden).normal_().requires_grad_()
    w = torch.empty(vocab, hidden).normal_(0, 0.02).requires_grad_()
    y = torch.randint(0, vocab, (batch, length))  # label_frac=1: every position is a label (chunked worst case)
    y[:, : length - int(round(label_frac * length))] = -100
    before, maxrss_before = _rss_bytes(), _maxrss_bytes()
    compute(h, w, y)
    peak = _maxrss_bytes()
    return {"path": path, "label_frac": label_frac, "rss_before_bytes": before,
            "maxrss_before_bytes": maxrss_before, "peak_rss_bytes": peak,
            "peak_increase_bytes": peak - before,
            "high_water_mark_already_above_baseline_bytes": max(0, maxrss_before - before),
            "shape": {"batch": batch, "length": length, "hidden": hidden, "vocab": vocab},
            "note": "increase includes the gradient buffers of hidden (2.4 MB) and weight (113 MB), same in both"}


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _maxrss_bytes() -> int:
    """Peak RSS of this process. On Linux: VmHWM of /proc/self/status, because ``getrusage().ru_maxrss`` is kept
    across fork + execve, so a child started by a big parent would report the parent's peak; VmHWM belongs to the
    address space, which execve replaces. Elsewhere: ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def _quiet_libraries() -> None:
    """Same in the parent and in every child: TRL's on-disk caches are keyed by fingerprints that hash its
    dataset-processing closures, which see the logging state."""
    import logging
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _children(jobs: dict[str, list[str]], threads: int, parallel: int) -> dict[str, dict]:
    """Run this script as child processes (at most `parallel` at once); each prints one JSON line last.
    Only memory is measured in children, and a process's peak RSS does not depend on CPU contention."""
    pending, running, results = list(jobs.items()), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            key, args = pending.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), *args]
            running[key] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            cwd=ROOT)
        time.sleep(0.2)
        for key, proc in list(running.items()):
            if proc.poll() is None:
                continue
            out, err = proc.communicate()
            del running[key]
            if proc.returncode != 0:
                for other in running.values():
                    other.kill()
                raise RuntimeError(f"child {jobs[key]} failed:\n{err[-4000:]}")
            results[key] = json.loads(out.strip().splitlines()[-1])
            print(f"[child] {key}: peak RSS {results[key]['peak_rss_bytes'] / 2**20:.0f} MB", flush=True)
    return results


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------


def _median(xs):
    return statistics.median(xs)


def summarize(inter: dict, rss: dict, logprob: dict, meta: dict) -> dict:
    recs = inter["records"]
    per_impl = {}
    for name, rs in recs.items():
        timed = [r for r in rs if r["round"] > 0]
        med_s = _median([r["seconds"] for r in timed])
        med_tok = _median([r["tokens"] for r in timed])
        per_impl[name] = {
            "median_step_seconds": round(med_s, 4),
            "median_optimizer_seconds": round(_median([r["opt_seconds"] for r in timed]), 4),
            "median_step_cpu_seconds": round(_median([r["cpu_seconds"] for r in timed]), 4),
            "step_cpu_seconds": [round(r["cpu_seconds"], 3) for r in timed],
            "loadavg_1min_before_step": [round(r["loadavg_1min_before"], 2) for r in timed],
            "tokens_per_step_median": med_tok,
            "tokens_per_second": round(sum(r["tokens"] for r in timed) / len(timed) / med_s, 2),
            "step_seconds": [round(r["seconds"], 4) for r in timed],
            "warmup_step_seconds": round(rs[0]["seconds"], 4),
            "losses": [round(r["loss"], 6) for r in rs],
            "peak_rss_mb": round(rss[name]["peak_rss_bytes"] / 2**20, 1),
            "rss_after_setup_mb": round(rss[name]["rss_after_setup_bytes"] / 2**20, 1),
            "setup_in_timing_process": inter["setup"][name],
            "setup_in_rss_child": rss[name]["setup"],
            "rss_child_step_seconds": [round(t, 2) for t in rss[name]["step_seconds"]],
        }
    tokens_equal = all([r["tokens"] for r in recs[n]] == [r["tokens"] for r in recs["tether"]] for n in recs)
    loss_diff = {n: max(abs(a["loss"] - b["loss"]) for a, b in zip(recs[n], recs["tether"])) for n in recs}
    ratios = {}
    for name in TRL_VARIANTS:
        if name not in per_impl:
            continue
        # same tokens per step for both, so the tokens/s ratio is the inverse ratio of the median step times
        paired = [b["seconds"] / a["seconds"] for a, b in zip(recs["tether"], recs[name]) if a["round"] > 0]
        ratios[name] = {
            "tokens_per_second_ratio": round(per_impl["tether"]["tokens_per_second"]
                                             / per_impl[name]["tokens_per_second"], 3),
            "check_median_of_per_round_ratios": round(_median(paired), 3),
            "check_per_round_ratios": [round(x, 3) for x in paired],
            "check_cpu_time_ratio": round(per_impl[name]["median_step_cpu_seconds"]
                                          / per_impl["tether"]["median_step_cpu_seconds"], 3),
            "median_step_time_ratio_trl_over_tether": round(per_impl[name]["median_step_seconds"]
                                                            / per_impl["tether"]["median_step_seconds"], 3),
            "peak_rss_ratio": round(rss["tether"]["peak_rss_bytes"] / rss[name]["peak_rss_bytes"], 3),
            "meets_speed_target_ge_1.5x": per_impl["tether"]["tokens_per_second"]
            >= 1.5 * per_impl[name]["tokens_per_second"],
            "meets_memory_target_le_0.7x": rss["tether"]["peak_rss_bytes"] <= 0.7 * rss[name]["peak_rss_bytes"],
        }
    lp = {k: {"label_frac": v["label_frac"], "peak_increase_mb": round(v["peak_increase_bytes"] / 2**20, 1),
              "high_water_mark_already_above_baseline_mb":
                  round(v["high_water_mark_already_above_baseline_bytes"] / 2**20, 1)} for k, v in logprob.items()}
    lp["ratio_chunked_over_plain"] = round(logprob["chunked"]["peak_increase_bytes"]
                                           / logprob["plain"]["peak_increase_bytes"], 3)
    lp["ratio_chunked_half_labelled_over_plain"] = round(logprob["chunked_half_labelled"]["peak_increase_bytes"]
                                                         / logprob["plain"]["peak_increase_bytes"], 3)
    lp["chunk_size"] = 512
    lp["shape"] = logprob["chunked"]["shape"]
    lp["note"] = logprob["chunked"]["note"]
    return {"meta": meta, "ratios_tether_over_trl": ratios, "targets": {
                "tokens_per_second_ratio": ">= 1.5 (vs TRL defaults)", "peak_rss_ratio": "<= 0.7 (vs TRL defaults)"},
            "checks": {"tokens_per_step_identical": tokens_equal, "max_abs_loss_diff_vs_tether": loss_diff},
            "implementations": per_impl, "logprob_memory": lp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed interleaved rounds (after one warm-up round)")
    ap.add_argument("--rss-steps", type=int, default=1, help="steps after the warm-up in each peak-RSS child")
    ap.add_argument("--impls", default=DEFAULT_IMPLS, help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--parallel-children", type=int, default=1,
                    help="memory-measuring child processes run at once (peak RSS does not depend on contention)")
    ap.add_argument("--tether-gc", action="store_true", help="tether with gradient checkpointing of the backbone")
    ap.add_argument("--tether-chunk-size", type=int, default=None, help="tether's LM-head chunk size (default 512)")
    ap.add_argument("--out", default=str(OUT_FILE))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--only", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--logprob-mem", choices=("chunked", "plain"), help=argparse.SUPPRESS)
    ap.add_argument("--label-frac", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.tether_gc:
        TETHER_OPTIONS["gradient_checkpointing"] = True
    if args.tether_chunk_size:
        TETHER_OPTIONS["chunk_size"] = args.tether_chunk_size
    tether_flags = (["--tether-gc"] if args.tether_gc else []) + (
        ["--tether-chunk-size", str(args.tether_chunk_size)] if args.tether_chunk_size else [])
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not args.logprob_mem:  # the log-prob children need neither transformers nor datasets
        _quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.only or args.logprob_mem:
        out = (run_only(args.only, args.rss_steps, Path(args.workdir)) if args.only
               else run_logprob_mem(args.logprob_mem, args.label_frac))
        print(json.dumps(out))
        return

    names = [n.strip() for n in args.impls.split(",") if n.strip()]
    assert args.steps + 1 <= SCHEDULE_STEPS and args.rss_steps + 1 <= SCHEDULE_STEPS
    assert names[0] == "tether" and set(names) <= set(IMPLS), f"--impls must start with tether, from {IMPLS}"
    t_start = time.perf_counter()
    import transformers
    import trl

    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": threads,
                    "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__},
        "setting": {"model": "SmolLM2-135M-Instruct (embedded, fp32)", "device": "cpu", "dtype": "float32",
                    "pairs": N_PAIRS, "batch_pairs": BATCH_SIZE, "max_length": MAX_LENGTH, "lr": LR, "beta": BETA,
                    "max_grad_norm": MAX_GRAD_NORM, "timed_steps": args.steps, "warmup_steps": 1,
                    "tether_options": dict(TETHER_OPTIONS),
                    "data": str(DATA_FILE.relative_to(ROOT)) if DATA_FILE.exists() else
                    "generated: tether.tasks prompts + templated completions (no data/ifeval_pairs_smollm2.jsonl)"},
    }
    print(f"[meta] {json.dumps(meta)}", flush=True)
    # Children first, while this process is still small (the machine's memory is shared). They share a work
    # directory with this process, so each one-time reference pass (tether's recipe cache, TRL's datasets cache)
    # runs once, in the first child that needs it, and is read from disk afterwards.
    tmp = tempfile.TemporaryDirectory(prefix="tether-bench-")
    workdir = Path(tmp.name)
    jobs = {name: ["--only", name, "--rss-steps", str(args.rss_steps), "--workdir", str(workdir), *tether_flags]
            for name in names}
    jobs.update({f"logprob:{name}": ["--logprob-mem", p, "--label-frac", str(f)] for name, p, f in LOGPROB_RUNS})
    results = _children(jobs, threads, args.parallel_children)
    rss = {name: results[name] for name in names}
    logprob = {name: results[f"logprob:{name}"] for name, _, _ in LOGPROB_RUNS}
    t_children = time.perf_counter() - t_start
    inter = run_interleaved(names, args.steps, workdir)
    tmp.cleanup()
    meta["wall_seconds"] = {"children": round(t_children, 1),
                            "interleaved_timing": round(time.perf_counter() - t_start - t_children, 1),
                            "total": round(time.perf_counter() - t_start, 1)}
    result = summarize(inter, rss, logprob, meta)
    text = json.dumps(result, indent=2)
    if not args.no_write:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(json.dumps({"ratios_tether_over_trl": result["ratios_tether_over_trl"], "checks": result["checks"],
                      "logprob_memory": result["logprob_memory"],
                      "tokens_per_second": {n: v["tokens_per_second"] for n, v in result["implementations"].items()},
                      "peak_rss_mb": {n: v["peak_rss_mb"] for n, v in result["implementations"].items()},
                      "wall_seconds": meta["wall_seconds"]}, indent=2))


if __name__ == "__main__":
    main()
