"""`tether frontier`: which method buys the most reward per nat of KL? Every point of a declared sweep — best-of-N
over N, tilted resampling over β, DPO-family and RL-family runs over β (or steps), saved model directories — gets
its held-out reward and KL(π ‖ π_ref) from one evaluator, on the same prompts, with π_ref = ``model`` at
temperature 1.

    tether frontier --config configs/frontier_smollm2.yaml

1. **Set-up.** π_ref and its tokenizer, the held-out rows (the first ``max_prompts``), the rule reward.
2. **Inference-time points** (best-of-N, tilted). max(N) candidates plus ``base_samples`` further reference draws
   per prompt, drawn once (``tether.inference.draw_candidates``); each point selects among the first N
   (``tether.inference.METHODS``). Its reward is the kept completion's; its KL is that of the law the selection
   induces, which no sampled policy exposes token by token, so it is one of ``tether.inference.accounting``'s
   figures, named with its kind (``INFERENCE_KL_ORDER``: the reward-level plug-in when every prompt has few reward
   levels, else Beirami et al.'s estimate for best-of-N and the self-normalized estimate for tilting).
3. **Weight-space points.** Each DPO / RL run is the recipe itself (``tether.recipes.preference.train`` /
   ``online_rl.train``) on its own YAML with β (or steps) replaced, saved under ``output_dir/runs``; it and each
   saved model directory are measured by ``evaluate_policy``: ``samples_per_prompt`` completions per prompt at
   temperature 1, the same seed for every policy; their rewards; and the exact full-vocabulary token KL along them
   (``tether.eval.kl.completions_kl``): token-level (Σ KL_t / Σ |y|) and sequence-level (Σ_t KL_t, Rao–Blackwellised;
   the k1 Monte-Carlo sum beside it), each with a 95% CI.
4. **Curves** on each prompt's empirical reward-level law p̂ (its N + M reference draws), averaged over prompts:
   the analytic best-of-N KL log N − (N−1)/N (Beirami et al. 2024, arXiv:2401.01879; exact for an atomless reward,
   an upper bound otherwise) against best-of-N's expected reward on p̂, and the tilted optimum π*_β ∝ p̂·exp(r/β)
   (KL and expected reward as β runs; the maximizer of E[r] − β·KL, so on p̂ no policy lies above it at equal
   average KL — Korbak et al. 2022). Both are plug-ins on the sampled levels: a trained policy that finds rewards
   the reference draws never showed can lie above the drawn curve.
5. **Cache.** Each point is stored under a fingerprint of what determines it (method, hyperparameters and the full
   training config, the model and the weights' file stamps, the prompts, seeds, the evaluator's settings) in
   ``frontier_cache.json``, rewritten atomically after every point; a rerun recomputes only what is missing, so a
   sweep resumes after an interruption and extends when points are added. Candidates are drawn at max(N) + M per
   prompt, so changing the largest N (or tilted_n, base_samples) redraws them and recomputes the inference points.
6. **Output.** ``frontier.json`` (every point, its KL figures and their kinds, the curves, what was cached) and
   ``frontier.png`` (reward vs sequence-level KL with 95% error bars, one series per method, the two curves).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tether.inference import METHODS, Candidates, MethodResult, draw_candidates, laws
from tether.inference.accounting import summarize_values
from tether.recipes.analysis_configs import FrontierConfig
from tether.recipes.configs import PreferenceConfig, RLConfig

__all__ = ["INFERENCE_KL_ORDER", "PointCache", "best_of_n_curve", "declared_points", "evaluate_policy",
           "fingerprint", "inference_point", "run", "tilted_optimum_curve"]

CACHE_VERSION = 1
INFERENCE_KL_ORDER = {"best_of_n": ("reward_level_plugin", "beirami_estimate"),
                      "tilted": ("reward_level_plugin", "selection_bound")}
"""Which of a method's KL figures is its point's sequence-level KL: the first that applies to every prompt."""
RUN_FIELDS_NOT_IN_FINGERPRINT = {"output_dir", "progress", "tensorboard", "resume", "stop_after", "save_every",
                                 "overwrite"}


# ------------------------------------------------------------------------------------------------------------
# Fingerprints and the cache.
# ------------------------------------------------------------------------------------------------------------


def fingerprint(payload: dict) -> str:
    """sha256 of the canonical JSON of ``payload`` (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def model_stamp(name: str) -> dict:
    """What identifies a model: its name, and for a directory the size and modification time of every weight and
    config file (a retrained directory gets a new stamp)."""
    path = Path(name)
    if not path.is_dir():
        return {"name": name}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".gguf"))
    return {"name": str(path.resolve()), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


class PointCache:
    """fingerprint → point record, in one JSON file rewritten atomically (a temporary file, then ``os.replace``)
    after every new point."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("version") == CACHE_VERSION:
                self.entries = data["points"]
            else:
                print(f"{self.path}: cache version {data.get('version')} != {CACHE_VERSION}; starting a new cache")

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, record: dict) -> None:
        self.entries[key] = record
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "points": self.entries}, indent=1))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------------------------
# The sweep.
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PointSpec:
    """One declared point: what it is and what determines it."""

    method: str
    """'best_of_n', 'tilted', 'dpo', 'rl' or 'model'."""
    label: str
    params: dict
    payload: dict
    """Everything the point depends on beyond the shared context (the fingerprint's input)."""
    run_config: PreferenceConfig | RLConfig | None = None
    """The training run of a DPO / RL point (output_dir set)."""


def _run_config(cls, path: str, values: dict, cfg: FrontierConfig):
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{'dpo_config' if cls is PreferenceConfig else 'rl_config'}: {path} does not exist")
    raw = yaml.safe_load(file.read_text()) or {}
    known = {f.name for f in dataclasses.fields(cls)}
    for where, keys in ((str(file), raw), ("overrides", values)):
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown} for the {cls.__name__}; known: {sorted(known)}")
    # An override dict is typed float | int | str | bool, so a command line's 4 can arrive as 4.0: back to int where
    # the field is an int.
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    values = {k: int(v) if isinstance(v, float) and v.is_integer() and "int" in types[k] and "float" not in types[k]
              else v for k, v in values.items()}
    # No intermediate checkpoints unless the overrides ask for them: the frontier needs the final model only.
    return cls(**{**raw, "save_every": 0, **values, "model": cfg.model, "seed": cfg.seed, "progress": cfg.progress,
                  "tensorboard": False, "device": cfg.device})


def declared_points(cfg: FrontierConfig) -> list[PointSpec]:
    """Every point of the sweep, in the order of the report."""
    specs = [PointSpec("best_of_n", f"best-of-{n}", {"n": n}, {"n": n}) for n in cfg.best_of_n]
    specs += [PointSpec("tilted", f"tilted β={b:g}", {"beta": b, "n": cfg.tilted_n}, {"beta": b, "n": cfg.tilted_n})
              for b in cfg.tilted_beta]
    runs_dir = Path(cfg.output_dir) / "runs"
    for beta in cfg.dpo_beta:
        run = _run_config(PreferenceConfig, cfg.dpo_config, {**cfg.dpo_overrides, "beta": beta,
                                                             "eval_prompts_file": None}, cfg)
        specs.append(_training_spec("dpo", f"{run.loss} β={beta:g}", {"beta": beta, "loss": run.loss}, run, runs_dir))
    for beta in cfg.rl_beta:
        for steps in cfg.rl_steps or [None]:
            values = {**cfg.rl_overrides, "kl_coef": beta, "eval_prompts": 0, "eval_prompts_file": None}
            if steps is not None:
                values["steps"] = steps
            run = _run_config(RLConfig, cfg.rl_config, values, cfg)
            specs.append(_training_spec("rl", f"{run.loss} β={beta:g}, {run.steps} steps",
                                        {"beta": beta, "steps": run.steps, "loss": run.loss}, run, runs_dir))
    specs += [PointSpec("model", Path(m).name or m, {"path": m}, {"model": model_stamp(m)}) for m in cfg.models]
    return specs


def _training_spec(method: str, label: str, params: dict, run, runs_dir: Path) -> PointSpec:
    hyper = {k: v for k, v in dataclasses.asdict(run).items() if k not in RUN_FIELDS_NOT_IN_FINGERPRINT}
    # Data files the run reads enter by content, not only by name.
    files = {k: _file_digest(v) for k, v in hyper.items() if k.endswith("_file") and isinstance(v, str) and v}
    payload = {"config": hyper, "files": files}
    key = fingerprint({"method": method, **payload})[:12]
    run = dataclasses.replace(run, output_dir=str(runs_dir / f"{method}-{key}"))
    return PointSpec(method, label, params, payload, run)


def _file_digest(path: str) -> str | None:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


# ------------------------------------------------------------------------------------------------------------
# The evaluator: one for every policy with weights, one reading of the accounting for inference-time methods.
# ------------------------------------------------------------------------------------------------------------


def evaluate_policy(policy, reference, tokenizer, rows: list[dict], reward: Callable, *, samples_per_prompt: int,
                    max_new_tokens: int, seed: int, batch_size: int = 32, chunk_size: int = 512,
                    use_chat_template: bool = True, progress: bool = False) -> dict:
    """Held-out reward and KL(policy ‖ reference) on the same completions: ``samples_per_prompt`` per row sampled
    from ``policy`` at temperature 1 (seeded), each scored by ``reward`` and run through the exact full-vocabulary
    KL pass (``tether.eval.kl.completions_kl``). Returns the point's ``reward``, ``sequence_kl`` (Σ_t KL_t per
    completion, Rao–Blackwellised, 95% CI over completions), ``token_kl`` (Σ KL_t / Σ |y|, delta-method CI) and the
    full ``kl_report``."""
    from tether.eval.kl import completions_kl
    from tether.rollout import score_completions
    from tether.sampling import render_prompts, sample

    prompt_ids = render_prompts(tokenizer, [r["prompt"] for r in rows], use_chat_template=use_chat_template)
    with torch.no_grad():
        done = sample(policy, tokenizer, prompt_ids, n=samples_per_prompt, max_new_tokens=max_new_tokens,
                      temperature=1.0, seed=seed, batch_size=batch_size, progress=progress, desc="frontier: sampling")
    raw = score_completions(reward, rows, done)
    values = torch.tensor([math.nan if v is None else float(v) for v in raw], dtype=torch.float64)
    report = completions_kl(policy, reference, tokenizer, done, prompts=len(rows), max_new_tokens=max_new_tokens,
                            batch_size=batch_size, chunk_size=chunk_size)
    seq = report["sequence_kl_rao_blackwell"]
    return {"reward": summarize_values(values),
            "sequence_kl": {"mean": seq["mean"], "ci95": seq["ci95"], "n": seq["n"], "kind": "exact per token",
                            "how": "Σ_t exact full-vocabulary KL_t along completions sampled from the policy "
                                   "(Rao–Blackwellised k1; unbiased); 95% CI over the completions"},
            "token_kl": {"mean": report["token_kl"]["mean"], "ci95": report["token_kl"]["ci95"],
                         "kind": "exact per token", "how": "Σ KL_t / Σ |y| over the same completions (delta-method "
                                                           "CI)"},
            "kl_report": report}


def inference_point(result: MethodResult, cands: Candidates) -> dict:
    """A selection's point: the kept completions' reward and the first applicable KL figure of
    ``INFERENCE_KL_ORDER`` as its sequence-level KL. Its token-level KL is that figure divided by the mean length of
    the kept completions — the quantity ``completions_kl``'s Σ KL_t / Σ |y| estimates for a policy (E Σ_t KL_t =
    the sequence KL) — with the CI scaled alike (the length's own spread is not in it)."""
    figures = {name: fig.summary() for name, fig in result.kl.items()}
    name = next((k for k in INFERENCE_KL_ORDER[result.method]
                 if k in figures and figures[k]["mean"] is not None and figures[k]["not_applicable"] == 0), None)
    if name is None:  # none applies to every prompt: the first that applies to some (its count says how many)
        name = next((k for k in INFERENCE_KL_ORDER[result.method] if k in figures and figures[k]["mean"] is not None),
                    INFERENCE_KL_ORDER[result.method][-1])
    fig = figures[name]
    kept = result.kept(cands)
    mean_len = sum(len(cands.done.completion_ids[k]) for k in kept) / len(kept)
    ci = fig["ci95"] or [None, None]
    per_token = [None if x is None else x / mean_len for x in (fig["mean"], *ci)]
    return {"reward": summarize_values(result.reward),
            "sequence_kl": {"mean": fig["mean"], "ci95": ci, "n": fig["n"], "not_applicable": fig["not_applicable"],
                            "kind": fig["kind"], "figure": name,
                            "how": fig["how"] + "; 95% CI over prompts (a plug-in's or estimate's own bias is not "
                                                "in it)"},
            "token_kl": {"mean": per_token[0], "ci95": per_token[1:], "kind": fig["kind"],
                         "how": f"the sequence-level figure ÷ the mean kept length ({mean_len:.1f} tokens)"},
            "kl_figures": figures, "win_rate": summarize_values(result.win_rate)}


# ------------------------------------------------------------------------------------------------------------
# Curves on the reference draws' reward-level laws.
# ------------------------------------------------------------------------------------------------------------


def _level_laws(rewards: torch.Tensor, scored: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(values, p̂) of each prompt's scored reference draws; prompts without one are left out."""
    out = []
    for r, s in zip(rewards, scored):
        if s.any():
            values, counts = torch.unique(r[s], return_counts=True)
            out.append((values.double(), counts.double() / counts.sum()))
    return out


def best_of_n_curve(level_laws, ns) -> list[dict]:
    """For each N: the analytic KL log N − (N−1)/N and best-of-N's expected reward, averaged over the prompts' level
    laws (``laws.best_of_n_law`` on p̂), and the exact KL of best-of-N on p̂ beside it (≤ the analytic value; equal
    without ties)."""
    out = []
    for n in ns:
        reward = [float((laws.best_of_n_law(p, v, n) * v).sum()) for v, p in level_laws]
        exact = [laws.kl(laws.best_of_n_law(p, v, n), p) for v, p in level_laws]
        out.append({"n": n, "kl": laws.bon_kl_bound(n), "reward": sum(reward) / len(reward),
                    "kl_on_levels": sum(exact) / len(exact)})
    return out


def tilted_optimum_curve(level_laws, betas=None) -> list[dict]:
    """For each β: KL(π*_β ‖ p̂) and E_{π*_β}[r] with π*_β ∝ p̂·exp(r/β), averaged over the prompts' level laws; β
    from large (π_ref) to small (the best level). Sharing β across prompts makes the average the optimum at equal
    average KL (the per-prompt Lagrangians decouple)."""
    if betas is None:
        span = max(float(v.max() - v.min()) for v, _ in level_laws) or 1.0
        betas = [span * 10 ** (3 - 5 * i / 59) for i in range(60)]
    out = []
    for beta in betas:
        kls, rewards = [], []
        for v, p in level_laws:
            star, _ = laws.tilted_law(p, v, beta)
            kls.append(max(laws.kl(star, p), 0.0))
            rewards.append(float((star * v).sum()))
        out.append({"beta": beta, "kl": sum(kls) / len(kls), "reward": sum(rewards) / len(rewards)})
    return out


# ------------------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------------------


def _train(spec: PointSpec) -> Path:
    """Run the recipe of a DPO / RL point; the trained model's directory. The run's directory is named by the
    fingerprint of its config and its final model is written atomically, so a final model already there is that
    run's, finished (a sweep interrupted between training and evaluation does not train again)."""
    if spec.method == "dpo":
        from tether.recipes.preference import train
    else:
        from tether.recipes.online_rl import train
    final = Path(spec.run_config.output_dir) / "final"
    if (final / "config.json").is_file():
        print(f"{spec.label}: the finished run in {spec.run_config.output_dir} is reused")
        return final
    from tether.checkpoints import latest_checkpoint

    # An interrupted run of this point (same fingerprint, so the same config) continues from its checkpoint.
    train(dataclasses.replace(spec.run_config, resume=latest_checkpoint(spec.run_config.output_dir) is not None))
    if not (final / "config.json").is_file():
        raise ValueError(f"{spec.label}: the run in {spec.run_config.output_dir} ended without a final model")
    return final


def run(cfg: FrontierConfig, *, model=None, tokenizer=None, reward: Callable | None = None,
        use_chat_template: bool = True) -> dict:
    """Measure every declared point (cached ones are read back), write ``frontier.json`` and ``frontier.png``.
    ``model`` / ``tokenizer`` / ``reward`` replace the configured ones (a model defined in Python, e.g. a toy)."""
    from tether.data import load_prompt_rows
    from tether.models import load_model, load_tokenizer
    from tether.rewards import build_reward
    from tether.training import start_run

    t0 = time.perf_counter()
    out_dir = start_run(cfg)
    rows = load_prompt_rows(cfg.prompts_file)
    if cfg.max_prompts is not None:
        rows = rows[:cfg.max_prompts]
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    # π_ref is loaded on first use: a sweep read wholly from the cache loads no model.
    reference = functools.cache(lambda: model if model is not None else load_model(cfg.model).to(cfg.device).eval())
    reward = reward if reward is not None else build_reward(cfg.rewards or {"instructions": 1.0})
    cache = PointCache(out_dir / "frontier_cache.json")

    # Shared context of every point: π_ref, the prompts, the seed, the evaluator's settings.
    context = {"model": model_stamp(cfg.model) if model is None else {"python": type(model).__name__},
               "prompts": fingerprint({"rows": rows}), "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
               "rewards": cfg.rewards or {"instructions": 1.0}, "chat_template": use_chat_template}
    n_cands = max([*cfg.best_of_n, cfg.tilted_n if cfg.tilted_beta else 1])
    draw = {"candidates": n_cands, "base_samples": cfg.base_samples}
    specs = declared_points(cfg)
    per_policy = {"samples_per_prompt": cfg.samples_per_prompt}
    keys = [fingerprint({**context, "method": s.method, **s.payload,
                         **(draw if s.method in INFERENCE_KL_ORDER else per_policy)}) for s in specs]
    curves_key = fingerprint({**context, **draw, "curves": sorted({*cfg.best_of_n, *range(1, 17)})})
    points, computed, cached = [], 0, 0

    cands = None
    need_cands = (cfg.best_of_n or cfg.tilted_beta) and (
        cache.get(curves_key) is None or any(cache.get(k) is None for s, k in zip(specs, keys)
                                             if s.method in INFERENCE_KL_ORDER))
    if need_cands:
        cands = draw_candidates(reference(), tokenizer, rows, reward, n=n_cands, base_samples=cfg.base_samples,
                                max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=cfg.seed,
                                batch_size=cfg.batch_size, use_chat_template=use_chat_template,
                                progress=cfg.progress)
        if cache.get(curves_key) is None:
            levels = _level_laws(cands.rewards, cands.scored)
            cache.put(curves_key, {
                "best_of_n": best_of_n_curve(levels, sorted({*cfg.best_of_n, *range(1, 17)})) if levels else [],
                "tilted_optimum": tilted_optimum_curve(levels) if levels else [],
                "prompts_with_levels": len(levels), "draws_per_prompt": n_cands + cfg.base_samples,
                "draws_without_reward_opinion": int((~cands.scored).sum()),
                "draws_cut_at_max_new_tokens": sum(not f for f in cands.done.finished)})

    for spec, key in zip(specs, keys):
        record = cache.get(key)
        was_cached = record is not None
        if was_cached:
            cached += 1
        else:
            t_point = time.perf_counter()
            if spec.method in INFERENCE_KL_ORDER:
                gen = torch.Generator().manual_seed(int(key[:15], 16))  # a function of the point, not its place
                kwargs = {"beta": spec.params["beta"]} if spec.method == "tilted" else {}
                result = METHODS[spec.method](cands, spec.params["n"], generator=gen, **kwargs)
                record = inference_point(result, cands)
            else:
                path = _train(spec) if spec.run_config is not None else Path(spec.params["path"])
                policy = load_model(str(path)).to(cfg.device).eval()
                record = evaluate_policy(policy, reference(), tokenizer, rows, reward,
                                         samples_per_prompt=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                         seed=cfg.seed, batch_size=cfg.batch_size, chunk_size=cfg.chunk_size,
                                         use_chat_template=use_chat_template, progress=cfg.progress)
                record["model_dir"] = str(path)
                del policy
            record.update(method=spec.method, label=spec.label, params=spec.params, fingerprint=key,
                          seconds=time.perf_counter() - t_point)
            cache.put(key, record)
            computed += 1
        points.append(record)
        print(_format_point(record) + ("  (cached)" if was_cached else ""))

    curves = cache.get(curves_key)
    report = {"config": dataclasses.asdict(cfg), "prompts": len(rows), "points": points,
              "curves": curves, "computed": computed, "cached": cached, "seconds": time.perf_counter() - t0}
    (out_dir / "frontier.json").write_text(json.dumps(report, indent=2))
    plot(points, curves, out_dir / "frontier.png")
    if curves and "draws_per_prompt" in curves:
        print(f"reference draws: {curves['draws_per_prompt']} per prompt, {curves['draws_cut_at_max_new_tokens']} cut "
              f"at {cfg.max_new_tokens} tokens, {curves['draws_without_reward_opinion']} without a reward opinion")
    print(f"{len(points)} points ({computed} computed, {cached} from the cache) on {len(rows)} prompts; "
          f"{out_dir / 'frontier.json'}, {out_dir / 'frontier.png'} ({report['seconds']:.0f} s)")
    return report


def _format_point(p: dict) -> str:
    r, k, t = p["reward"], p["sequence_kl"], p["token_kl"]
    reward = "—" if r["mean"] is None else f"{r['mean']:.3f} ± {r['ci95'][1] - r['mean']:.3f}"
    if k["mean"] is None:
        return f"{p['label']:<28} reward {reward:<16} sequence KL — (no prompt with a KL figure)"
    return (f"{p['label']:<28} reward {reward:<16} sequence KL {k['mean']:.3f} "
            f"[{k['ci95'][0]:.3f}, {k['ci95'][1]:.3f}] nats ({k['kind']})  token KL {t['mean']:.4f}")


def _tag(point: dict) -> str:
    """A point's short name on the plot (the legend names the method): N=4, β=0.1, β=0.1/8 steps, a directory."""
    params = point["params"]
    if point["method"] == "best_of_n":
        return f"N={params['n']}"
    if point["method"] == "model":
        return point["label"]
    return f"β={params['beta']:g}" + (f"/{params['steps']} steps" if "steps" in params else "")


def plot(points: list[dict], curves: dict | None, path: Path) -> None:
    """Reward vs sequence-level KL with 95% error bars, one series per method, and the two curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    if curves and curves["tilted_optimum"]:
        bon, star = curves["best_of_n"], curves["tilted_optimum"]
        ax.plot([c["kl"] for c in star], [c["reward"] for c in star], color="0.3", lw=1.2,
                label="tilted optimum π* ∝ π_ref·exp(r/β) (plug-in)")
        ax.plot([c["kl"] for c in bon], [c["reward"] for c in bon], color="0.6", ls="--", lw=1.2,
                label="best-of-N at its bound log N − (N−1)/N")
        if all("kl_on_levels" in c for c in bon):
            # With few reward levels (rule rewards) best-of-N's exact KL sits far left of the bound: for a 0/1
            # reward at p = ½ and N = 16 it is 0.69 nats against 1.83. The points are measured on the levels, so
            # the curve they must lie on is this one.
            ax.plot([c["kl_on_levels"] for c in bon], [c["reward"] for c in bon], color="0.45", ls=":", lw=1.4,
                    label="best-of-N, exact on the reward levels")
    names = {"best_of_n": "best-of-N", "tilted": "tilted resampling", "dpo": "DPO family", "rl": "RL family",
             "model": "saved models"}
    for method, name in names.items():
        group = [p for p in points if p["method"] == method and p["reward"]["mean"] is not None
                 and p["sequence_kl"]["mean"] is not None]
        if not group:
            continue
        x = [p["sequence_kl"]["mean"] for p in group]
        y = [p["reward"]["mean"] for p in group]
        xerr = [[max(p["sequence_kl"]["mean"] - p["sequence_kl"]["ci95"][0], 0) for p in group],
                [max(p["sequence_kl"]["ci95"][1] - p["sequence_kl"]["mean"], 0) for p in group]]
        yerr = [[p["reward"]["mean"] - p["reward"]["ci95"][0] for p in group],
                [p["reward"]["ci95"][1] - p["reward"]["mean"] for p in group]]
        kinds = sorted({p["sequence_kl"]["kind"] for p in group})
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=f"{name} (KL: {', '.join(kinds)})")
        for p, xi, yi in zip(group, x, y):
            ax.annotate(_tag(p), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KL(π ‖ π_ref), nats per completion")
    ax.set_ylabel("held-out reward")
    ax.set_title("reward–KL frontier (95% CIs)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
