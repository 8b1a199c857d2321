"""`tether sample`: inference-time alignment on a prompts file — best-of-N and its relatives — with the KL of every
method to the base policy and how each KL figure was obtained.

    tether sample --config configs/best_of_n_instructions.yaml
    tether sample --prompts_file data/ifeval_heldout_prompts.jsonl --methods best_of_n tilted --n 1 4 16 --beta 0.1

1. **Set-up.** The model (π_ref is the model at ``temperature``; no top-k/top-p, so the recorded log-probs are those
   of the sampled law), the prompt rows and the reward (rule rewards by name, reward models, or an ensemble of
   them: ``tether.inference.ensemble``).
2. **Candidates.** max(n) candidates plus ``base_samples`` independent base draws per prompt, in one batched, seeded
   sampling call, each scored once (``tether.inference.candidates``). With ``exclude``, the sampler bans those
   strings ((G)I-DLE token exclusion, ``tether.sampling.exclusion``): the candidates, and so π_ref of the methods'
   KL figures, are then the excluded sampler's, and the exclusion's own exact KL cost to the model is reported
   (``intervention_kl``: each draw's summed next-token KL, ``Completions.kl_cost``; mean ± 95% CI over prompts).
3. **Q-probe** (only with method ``qprobe``). A probe loaded from ``qprobe``, or trained on the candidates of
   ``qprobe_train_file``'s prompts (from their rewards, or from best-vs-worst preferences) and saved; then its
   values on the candidates (``tether.inference.qprobe``).
4. **Methods.** Every method at every n — the first n candidates of each prompt, so all n share one set of draws —
   and at each of its parameters (τ for soft best-of-N and Q-probe, β for tilted resampling and rejection),
   ``tether.inference.methods.METHODS``.
5. **Output.** ``candidates.jsonl`` (every draw with its reward and sequence log-prob), ``samples.jsonl`` (one row
   per prompt and setting: the kept completion, its reward, win rate against the base draws, effective sample size
   and per-prompt KL figures), ``sample_report.json`` (means with 95% CIs; every KL figure with its kind — exact,
   estimate, bound, plug-in — and how it was obtained), and a table on the terminal.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from tether.inference import METHODS, Candidates, MethodResult, draw_candidates
from tether.inference.ensemble import EnsembleReward
from tether.inference.qprobe import QProbe, completion_features, fit_qprobe_preferences, fit_qprobe_rewards
from tether.models import load_model, load_tokenizer
from tether.recipes.analysis_configs import SampleConfig
from tether.sampling.exclusion import Exclude
from tether.sampling.sampler import kl_cost_summary
from tether.training import start_run

TAU_METHODS, BETA_METHODS = ("soft_best_of_n", "qprobe"), ("tilted", "rejection")


def build_sample_reward(cfg: SampleConfig):
    """The configured reward: the weighted mean of ``rewards`` and one reward model, or — with ``ensemble`` — the
    ensemble aggregate of every named rule reward and every reward model."""
    from tether.rewards import REWARD_NAMES, RewardModel, build_reward

    weights = cfg.rewards if cfg.rewards is not None else {"instructions": 1.0}
    if cfg.ensemble is None:
        return build_reward(weights, reward_model=cfg.reward_models[0] if cfg.reward_models else None)
    members = {name: REWARD_NAMES[name]() for name in weights}
    members.update({f"reward_model_{i}": RewardModel(p) for i, p in enumerate(cfg.reward_models)})
    return EnsembleReward(members, cfg.ensemble, cfg.ensemble_lambda)


def settings(cfg: SampleConfig) -> list[tuple[str, int, dict]]:
    """(method, n, parameters) of every run, in the order they are reported."""
    out = []
    for method in cfg.methods:
        if method == "plain":
            out.append((method, 1, {}))
            continue
        for n in cfg.n:
            if method in TAU_METHODS:
                out += [(method, n, {"tau": tau}) for tau in cfg.tau]
            elif method in BETA_METHODS:
                out += [(method, n, {"beta": beta}) for beta in cfg.beta]
            else:
                out.append((method, n, {}))
    return out


def qprobe_values(cfg: SampleConfig, model, tokenizer, reward, cands: Candidates, out_dir: Path) -> torch.Tensor:
    """(P, max n) the probe's values of every candidate; the probe is loaded, or trained and saved."""
    from tether.data import load_prompt_rows

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_max = max(cfg.n)
    if cfg.qprobe:
        probe = QProbe.load(cfg.qprobe)
    else:
        rows = load_prompt_rows(cfg.qprobe_train_file)
        train = draw_candidates(model, tokenizer, rows, reward, n=n_max, base_samples=0,
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                seed=cfg.seed + 104_729, batch_size=cfg.batch_size, progress=cfg.progress)
        feats = completion_features(model, train.done, pad, batch_size=cfg.batch_size).view(len(rows), n_max, -1)
        if cfg.qprobe_objective == "rewards":
            keep = train.scored
            probe = fit_qprobe_rewards(feats[keep], train.rewards[keep], l2=cfg.qprobe_l2)
        else:  # best vs worst candidate of each prompt whose rewards differ
            r = train.rewards.masked_fill(~train.scored, math.nan)
            hi, lo = r.nan_to_num(-math.inf).argmax(-1), r.nan_to_num(math.inf).argmin(-1)
            ok = train.scored.any(-1) & (r.gather(1, hi[:, None]) > r.gather(1, lo[:, None])).squeeze(-1)
            if not ok.any():
                raise ValueError(f"qprobe_train_file {cfg.qprobe_train_file}: no prompt has two candidates with "
                                 "different rewards, so no preference pair; use qprobe_objective 'rewards' or more n")
            idx = torch.arange(len(rows))[ok]
            probe = fit_qprobe_preferences(feats[idx, hi[ok]], feats[idx, lo[ok]], l2=cfg.qprobe_l2)
            print(f"q-probe: {int(ok.sum())} preference pairs from {len(rows)} prompts ({int((~ok).sum())} without "
                  "one: all candidates scored the same)")
        probe.save(out_dir / "qprobe.pt")
    columns = [cands.flat(i, j) for i in range(cands.prompts) for j in range(n_max)]
    sub = cands.done.select(columns)
    with torch.no_grad():
        return probe(completion_features(model, sub, pad, batch_size=cfg.batch_size)).view(cands.prompts, n_max)


def run_setting(cfg: SampleConfig, cands: Candidates, method: str, n: int, params: dict, index: int,
                q: torch.Tensor | None) -> MethodResult:
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    kwargs = dict(params)
    if method in ("soft_best_of_n", "tilted", "rejection"):
        kwargs.update(transform=cfg.reward_transform,
                      transform_args={"t": cfg.ctrl_t} if cfg.reward_transform.startswith("ctrl") else {})
    if method == "rejection":
        kwargs["reward_max"] = cfg.reward_max
    if method == "qprobe":
        kwargs["q"] = q
    return METHODS[method](cands, n, generator=gen, **kwargs)


def write_outputs(out_dir: Path, rows: list[dict], cands: Candidates, results: list[MethodResult]) -> None:
    done = cands.done
    with (out_dir / "candidates.jsonl").open("w") as f:
        for i in range(cands.prompts):
            for j in range(cands.n + cands.m):
                k = cands.flat(i, j)
                f.write(json.dumps({"prompt_index": i, "id": rows[i].get("id"), "column": j,
                                    "role": "candidate" if j < cands.n else "base", "completion": done.texts[k],
                                    "reward": float(cands.rewards[i, j]) if cands.scored[i, j] else None,
                                    "seq_logprob": float(cands.seq_logprob[i, j]), "finished": done.finished[k]})
                        + "\n")
    with (out_dir / "samples.jsonl").open("w") as f:
        for res in results:
            for i, k in enumerate(res.kept(cands)):
                f.write(json.dumps({
                    "prompt_index": i, "id": rows[i].get("id"), "method": res.method, "n": res.n, **res.params,
                    "completion": done.texts[k], "candidate": int(res.selection.index[i]),
                    "reward": _num(res.reward[i]), "win_rate": _num(res.win_rate[i]), "ess": _num(res.ess[i]),
                    "accepted": bool(res.selection.accepted[i]),
                    "seq_logprob": float(cands.seq_logprob[i, res.selection.index[i]]),
                    "kl": {name: _num(fig.values[i]) for name, fig in res.kl.items()}}) + "\n")


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(s: dict) -> str:
    return "—" if s["mean"] is None else f"{s['mean']:.3f}±{s['ci95'][1] - s['mean']:.3f}"


def format_table(summaries: list[dict]) -> str:
    head = (f"{'method':<15}{'n':>4} {'param':<11}{'reward':>14}{'win rate':>14}{'ESS':>8}  "
            "KL(π‖π_ref) nats: kind name mean±95%")
    lines = [head]
    for s in summaries:
        param = ", ".join(f"{k}={s[k]}" for k in ("tau", "beta") if k in s)
        kls = "; ".join(f"{f['kind']} {name} {_fmt(f)}" for name, f in s["kl"].items())
        lines.append(f"{s['method']:<15}{s['n']:>4} {param:<11}{_fmt(s['reward']):>14}{_fmt(s['win_rate']):>14}"
                     f"{s['ess']['mean']:>8.2f}  {kls}")
    return "\n".join(lines)


def run(cfg: SampleConfig) -> dict:
    from tether.data import load_prompt_rows

    t0 = time.perf_counter()
    out_dir = start_run(cfg)
    rows = load_prompt_rows(cfg.prompts_file)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model).to(cfg.device).eval()
    reward = build_sample_reward(cfg)
    exclude = [Exclude.from_strings(tokenizer, phrases=cfg.exclude)] if cfg.exclude else []

    cands = draw_candidates(model, tokenizer, rows, reward, n=max(cfg.n), base_samples=cfg.base_samples,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                            batch_size=cfg.batch_size, progress=cfg.progress, processors=exclude)
    q = qprobe_values(cfg, model, tokenizer, reward, cands, out_dir) if "qprobe" in cfg.methods else None
    results = [run_setting(cfg, cands, m, n, p, k, q) for k, (m, n, p) in enumerate(settings(cfg))]

    write_outputs(out_dir, rows, cands, results)
    summaries = [r.summary() for r in results]
    report = {"config": dataclasses.asdict(cfg), "prompts": len(rows), "candidates_per_prompt": max(cfg.n),
              "base_samples": cfg.base_samples,
              "no_opinion_draws": int((~cands.scored).sum()),
              "cut_at_max_new_tokens": sum(not f for f in cands.done.finished),
              "results": summaries, "seconds": time.perf_counter() - t0}
    cost = kl_cost_summary(cands.done)
    if cost:  # the sampler ran processors (exclude): what they cost against the model, per draw
        report["intervention_kl"] = {"kind": "exact", "mean": cost["intervention_kl"],
                                     "ci95_halfwidth": cost["intervention_kl_ci95"],
                                     "banned_steps": exclude[0].removed,
                                     "mean_banned_mass": exclude[0].removed_mass / max(exclude[0].removed, 1),
                                     "how": "Σ_t KL(q_t ‖ p_t) per draw, q_t the excluded law and p_t the model's, "
                                            "both at the sampling temperature; mean over prompts of the per-prompt "
                                            "mean, normal 95% CI"}
    (out_dir / "sample_report.json").write_text(json.dumps(report, indent=2))
    print(f"{len(rows)} prompts × ({max(cfg.n)} candidates + {cfg.base_samples} base draws); "
          f"{report['cut_at_max_new_tokens']} draws cut at {cfg.max_new_tokens} tokens, "
          f"{report['no_opinion_draws']} without a reward opinion")
    if cost:
        print(f"exclusion's KL cost to the model (exact, per draw): {cost['intervention_kl']:.4f} ± "
              f"{cost['intervention_kl_ci95']:.4f} nats; banned continuations held "
              f"{report['intervention_kl']['mean_banned_mass']:.4f} of the mass on average at the "
              f"{exclude[0].removed} (draw, step) pairs where one was possible")
    print(format_table(summaries))
    print(f"report: {out_dir / 'sample_report.json'}, completions: {out_dir / 'samples.jsonl'} "
          f"({report['seconds']:.0f} s)")
    return report
