"""TROLL, the critical-token KL and A*-PO through ``tether rl`` (the CLI) on a tiny model, each with an oracle.

Runs use the generated instruction task and its rule reward (``tether.rewards.InstructionFollowingReward``): on a
random byte-level model the completions are noise, but whole prompts differ in how many of their constraints noise
satisfies, so rewards are 0, 0.5 or 1 and groups differ. Oracles redraw the same completions (same weights, same
seeds) and recompute what the step logged from full logits in float64, independently of the recipe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tether.cli import main
from tether.group_filter import prompt_schedule, round_seed
from tether.models import load_model, load_tokenizer
from tether.rewards import build_reward
from tether.rollout import score_completions
from tether.sampling import render_prompts, sample
from tether.tasks import make_instruction_prompts
from tether.testing import make_tiny_model_dir

TINY = dict(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=10, train_prompts=8, eval_prompts=0, lr=3e-3,
            micro_batch_size=8, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("rl_obj") / "m", seed=0))


def run_cli(model_dir: str, out: Path, *flags: str, **values) -> list[dict]:
    """``tether rl`` with the tiny settings (overridden by ``values``) plus raw ``flags``; the logged steps."""
    args = ["rl", "--model", model_dir, "--output_dir", str(out), "--no_progress", "--no_tensorboard"]
    for name, value in {**TINY, **values}.items():
        args += [f"--{name}", str(value)]
    assert main([*args, *flags]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_zero(model_dir: str, n_prompts: int, group_size: int, max_new_tokens: int = 10):
    """The prompts, completions and rewards of step 0 (round 0), redrawn from the starting model."""
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    rows = make_instruction_prompts(TINY["train_prompts"], seed=0, split="train")
    chosen = [rows[i] for i in prompt_schedule(len(rows), 0, per_step=n_prompts, seed=0)]
    done = sample(model, tok, render_prompts(tok, [r["prompt"] for r in chosen]), n=group_size,
                  max_new_tokens=max_new_tokens, temperature=1.0, seed=round_seed(0, 0, 0), batch_size=64)
    return model, done, score_completions(build_reward({"instructions": 1.0}), chosen, done)


def test_troll_at_the_rollout_policy_is_ppo_and_keeps_its_trust_region(model_dir, tmp_path):
    """(1) One update per rollout: every update starts at θ = θ_old, where nothing is projected, the regression is 0
    and TROLL's gradient is PPO's −A·∇log π — same loss and gradient norm as ``--loss ppo_clip`` on the same batch
    (1e-5 relative: TROLL scores the batch in a separate pass, PPO in its update pass). (2) Two mini-batches at a
    high learning rate: the second starts away from θ_old, tokens are projected, and every projected token's
    KL(p̃ ‖ p_old) is ε, so the logged token-mean never exceeds ε (4e-4 here)."""
    troll = run_cli(model_dir, tmp_path / "troll", "--loss", "troll", steps=1)
    ppo = run_cli(model_dir, tmp_path / "ppo", "--loss", "ppo_clip", steps=1)
    (t,), (p,) = troll, ppo
    assert t["projected_frac"] == 0.0 and t["support_size"] == 16.0
    assert t["regression"] == pytest.approx(0.0, abs=1e-6)  # p_old from the scoring pass: p_θ up to rounding
    assert t["grad_norm"] > 0
    for key in ("loss", "grad_norm", "token_kl"):  # loss: −token-mean(A) ≈ 0 with group-normalized advantages
        assert t[key] == pytest.approx(p[key], rel=1e-5, abs=1e-6), key

    eps = 4e-4
    rows = run_cli(model_dir, tmp_path / "troll_mb", "--loss", "troll", "--loss_args", "eps", str(eps),
                   "max_support", "8", steps=2, prompts_per_step=4, mini_batches=2, lr=0.05)
    print([{k: r[k] for k in ("projected_frac", "kl_old_before", "kl_old_after", "sampled_in_support")} for r in rows])
    assert max(r["projected_frac"] for r in rows) > 0, "the second mini-batch must leave the trust region"
    assert max(r["kl_old_before"] for r in rows) > eps / 2
    for r in rows:
        assert r["support_size"] <= 8.0
        assert r["kl_old_after"] <= eps * (1 + 1e-3)


def test_critical_token_weights_are_the_references_certainty(model_dir, tmp_path):
    """Step 1's logged mean weight w_t = c_t^ρ, c_t = 1 + log max_a π_ref^{(T')}(a|s_t) / log|V|, over the response
    tokens, recomputed from the starting model's full logits in float64 (T' = 2, ρ = 0.5, so the weights of a
    near-uniform random model are far from 0); the KL terms are exactly 0 at step 1 (π = π_ref)."""
    (row,) = run_cli(model_dir, tmp_path / "ctk", "--loss", "critical_token_kl", "--loss_args", "rho", "0.5",
                     "ref_temperature", "2.0", steps=1)
    model, done, raw = step_zero(model_dir, TINY["prompts_per_step"], TINY["group_size"])
    assert row["no_opinion"] == 0 and all(r is not None for r in raw)
    model.double()
    weights = []
    with torch.no_grad():
        for p, c in zip(done.prompt_ids, done.completion_ids):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1].double()
            p_max = torch.log_softmax(logits / 2.0, -1).amax(-1)
            weights += ((1 + p_max / math.log(logits.shape[-1])).clamp(0, 1) ** 0.5).tolist()
    expected = sum(weights) / len(weights)
    print(f"logged weight_mean {row['weight_mean']:.8f}, float64 oracle {expected:.8f}")
    assert 0.05 < expected < 0.95
    assert row["weight_mean"] == pytest.approx(expected, rel=1e-5)
    assert row["kl_unweighted"] == pytest.approx(0.0, abs=1e-10) and row["kl_weighted"] == pytest.approx(0.0, abs=1e-10)


def test_astar_po_regresses_onto_reward_minus_reference_value(model_dir, tmp_path):
    """One completion per prompt (``group_size 1``). Stage 1 drew ``astar_value_samples`` = 4 completions of every
    training prompt from the reference; V*(x) = β₁·log mean_j exp(r_j/β₁) is recomputed here from the same seeded
    draw. At step 1 the policy is the reference (log-ratio 0), so the logged loss is mean_i (R_i − V*(x_i))² and the
    logged target the mean of R_i − V*(x_i), over the step's 4 completions."""
    beta1 = 0.5
    (row,) = run_cli(model_dir, tmp_path / "astar", "--loss", "astar_po", steps=1, group_size=1, prompts_per_step=4,
                     astar_value_samples=4, astar_value_beta=beta1)
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    rows = make_instruction_prompts(TINY["train_prompts"], seed=0, split="train")
    reward = build_reward({"instructions": 1.0})
    ref_draw = sample(model, tok, render_prompts(tok, [r["prompt"] for r in rows]), n=4, max_new_tokens=10,
                      temperature=1.0, seed=0 * 7_907 + 1, batch_size=64)
    ref_rewards = score_completions(reward, rows, ref_draw)
    v_star = [beta1 * math.log(sum(math.exp(r / beta1) for r in ref_rewards[4 * i:4 * i + 4]) / 4)
              for i in range(len(rows))]
    _, done, raw = step_zero(model_dir, 4, 1)
    chosen = prompt_schedule(len(rows), 0, per_step=4, seed=0)
    targets = [r - v_star[i] for r, i in zip(raw, chosen)]
    print(f"V* {[round(v, 4) for v in v_star]}, step-1 targets {[round(t, 4) for t in targets]}, logged {row}")
    assert len(set(ref_rewards)) > 1 and any(abs(t) > 0.05 for t in targets)
    assert row["target_advantage"] == pytest.approx(sum(targets) / 4, abs=1e-6)
    assert row["loss"] == pytest.approx(sum(t * t for t in targets) / 4, rel=1e-5, abs=1e-9)
    assert row["implicit_advantage"] == pytest.approx(0.0, abs=1e-9)
