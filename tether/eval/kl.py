"""How far did the policy move? Exact token-level KL and sequence-level KL with a 95% confidence interval.

For held-out prompts x, completions y are sampled from the policy π at temperature 1 (no top-p/top-k, so the
samples follow π itself). Along each sampled path, with s_t = (x, y_<t):

* exact token KL      KL_t = Σ_v π(v|s_t) log(π(v|s_t)/π_ref(v|s_t))  — summed over the full vocabulary;
* token-level KL      = Σ_{all sampled tokens} KL_t / (number of sampled tokens)  — the average per-token KL
                        under the policy's own state distribution;
* sequence-level KL   KL(π(·|x) ‖ π_ref(·|x)) = E_y[Σ_t log π(y_t|s_t) − log π_ref(y_t|s_t)], estimated two ways,
                        both unbiased: the Monte-Carlo sum of sampled log-ratios (``k1``) and its Rao–Blackwellised
                        form Σ_t KL_t (same expectation, lower variance). Each comes with mean ± 1.96·s/√n over
                        the n sampled sequences (prompts i.i.d., completions i.i.d. given the prompt).

A completion cut at ``max_new_tokens`` makes the estimate that of the KL between the distributions over the first
``max_new_tokens`` tokens; how many were cut is reported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tether.logprobs import lm_head, token_stats
from tether.rollout import backbone_states, collate
from tether.sampling import Completions, render_prompts, sample

__all__ = ["completions_kl", "format_kl_report", "measure_kl", "measure_kl_from_files"]


def _mean_ci(values: torch.Tensor) -> dict:
    n = values.numel()
    mean = values.mean().item()
    half = 1.96 * values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


@torch.no_grad()
def measure_kl(policy, reference, tokenizer, prompts, *, samples_per_prompt: int = 4, max_new_tokens: int = 64,
               seed: int = 0, batch_size: int = 16, chunk_size: int = 512, use_chat_template: bool = True,
               progress: bool = False) -> dict:
    """Sample from ``policy`` on ``prompts`` and measure KL(π ‖ π_ref); returns a JSON-ready report."""
    prompt_ids = render_prompts(tokenizer, prompts, use_chat_template=use_chat_template)
    done = sample(policy, tokenizer, prompt_ids, n=samples_per_prompt, max_new_tokens=max_new_tokens,
                  temperature=1.0, seed=seed, batch_size=batch_size, progress=progress, desc="KL: sampling")
    return completions_kl(policy, reference, tokenizer, done, prompts=len(prompts), max_new_tokens=max_new_tokens,
                          batch_size=batch_size, chunk_size=chunk_size)


@torch.no_grad()
def completions_kl(policy, reference, tokenizer, done: Completions, *, prompts: int, max_new_tokens: int,
                   batch_size: int = 16, chunk_size: int = 512) -> dict:
    """The report of ``measure_kl`` on completions already sampled from ``policy`` at temperature 1 (module
    docstring) — for a caller that also scores the same completions (``tether frontier``)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    weight, bias = lm_head(policy)
    ref_weight, ref_bias = lm_head(reference)
    rollout = collate(done, pad, weight.device)
    token_kl, seq_k1, seq_rb, lengths = [], [], [], []
    for start in range(0, rollout.size, batch_size):
        mb = rollout.rows(torch.arange(start, min(rollout.size, start + batch_size)))
        stats = token_stats(backbone_states(policy, mb, share_prompts=False), weight, mb.labels, bias=bias,
                            ref_hidden=backbone_states(reference, mb, share_prompts=False), ref_weight=ref_weight,
                            ref_bias=ref_bias, stats=("logps", "ref_logps", "kl"), chunk_size=chunk_size)
        seq_k1.append((stats["logps"] - stats["ref_logps"]).sum(-1))
        seq_rb.append(stats["kl"].sum(-1))
        lengths.append(mb.mask.sum(-1))
        token_kl.append(stats["kl"][mb.mask])
    seq_k1, seq_rb, lengths = torch.cat(seq_k1).double(), torch.cat(seq_rb).double(), torch.cat(lengths).double()
    all_tokens = torch.cat(token_kl).double()
    if not (torch.isfinite(all_tokens).all() and torch.isfinite(seq_k1).all()):
        raise ValueError("measure_kl: the KL is not finite — the policy or the reference gives NaN or inf "
                         "log-probs (non-finite weights); no report is written")
    # Ratio estimator Σ KL_t / Σ |y| with a delta-method CI over sequences.
    ratio = seq_rb.sum().item() / max(lengths.sum().item(), 1.0)
    n = seq_rb.numel()
    resid = seq_rb - ratio * lengths
    half = 1.96 * resid.std(unbiased=True).item() / (lengths.mean().item() * math.sqrt(n)) if n > 1 else float("nan")
    return {
        "token_kl": {"mean": ratio, "ci95": [ratio - half, ratio + half], "n_tokens": all_tokens.numel(),
                     "max": all_tokens.max().item() if all_tokens.numel() else 0.0},
        "sequence_kl_rao_blackwell": _mean_ci(seq_rb),
        "sequence_kl_monte_carlo": _mean_ci(seq_k1),
        "mean_completion_tokens": lengths.mean().item(),
        "completions": n,
        "prompts": prompts,
        "truncated_at_max_new_tokens": sum(not f for f in done.finished),
        "max_new_tokens": max_new_tokens,
    }


def measure_kl_from_files(*, policy: str, reference: str, prompts_file: str, samples_per_prompt: int = 4,
                          max_new_tokens: int = 64, seed: int = 0, output: str | Path | None = None,
                          chunk_size: int = 512, progress: bool = False, device: str = "cpu") -> dict:
    """Load both models from disk (onto ``device``), measure, print a summary and optionally write the report as
    JSON."""
    from tether.data import load_prompts
    from tether.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(policy)
    report = measure_kl(load_model(policy).to(device), load_model(reference).to(device), tokenizer,
                        load_prompts(prompts_file),
                        samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, seed=seed,
                        chunk_size=chunk_size, progress=progress)
    report.update(policy=str(policy), reference=str(reference), prompts_file=str(prompts_file))
    print(format_kl_report(report))
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2))
    return report


def format_kl_report(report: dict) -> str:
    tk, rb, mc = report["token_kl"], report["sequence_kl_rao_blackwell"], report["sequence_kl_monte_carlo"]
    return (f"KL(policy ‖ reference) on {report['prompts']} held-out prompts × "
            f"{report['completions'] // max(report['prompts'], 1)} samples "
            f"({report['truncated_at_max_new_tokens']} cut at {report['max_new_tokens']} tokens):\n"
            f"  token-level (exact, full vocab): {tk['mean']:.4f} nats/token  95% CI [{tk['ci95'][0]:.4f}, "
            f"{tk['ci95'][1]:.4f}]\n"
            f"  sequence-level (Σ exact token KL): {rb['mean']:.3f} nats  95% CI [{rb['ci95'][0]:.3f}, "
            f"{rb['ci95'][1]:.3f}]\n"
            f"  sequence-level (Monte-Carlo k1):   {mc['mean']:.3f} nats  95% CI [{mc['ci95'][0]:.3f}, "
            f"{mc['ci95'][1]:.3f}]")
