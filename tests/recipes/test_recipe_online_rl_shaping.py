"""GRPO-CARE's bonus with an EMA reference, online difficulty filtering and DAPO's dynamic sampling with refill,
through ``tether rl`` (the CLI) on a tiny model.

Rewards are the generated instruction task's rule reward (0, 0.5 or 1 on a random byte-level model: whole prompts
differ in how many constraints noise satisfies), so some groups pass, some are uniform and some are mixed. Oracles:
the EMA recursion recomputed from the checkpoints, the bonus recomputed in float64 from the redrawn step-0 batch,
the filter's counts against the logged batch, and bit-identical resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.checkpoints import load_module_state
from tether.cli import main
from tether.group_filter import prompt_schedule, round_seed
from tether.losses.policy import grpo_care_bonus
from tether.models import load_model, load_tokenizer
from tether.rewards import build_reward
from tether.rollout import answer_mask, collate, score_completions
from tether.sampling import render_prompts, sample
from tether.tasks import make_instruction_prompts
from tether.testing import make_tiny_model_dir

TINY = dict(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=10, train_prompts=8, eval_prompts=0, lr=3e-3,
            micro_batch_size=8, seed=0)
TIMING = {"gen_s", "reward_s", "score_s", "update_s", "gen_tokens_per_s"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("rl_shaping") / "m", seed=0))


def run_cli(model_dir: str, out: Path, *flags: str, **values) -> list[dict]:
    args = ["rl", "--model", model_dir, "--output_dir", str(out), "--no_progress", "--no_tensorboard"]
    for name, value in {**TINY, **values}.items():
        args += [f"--{name}", str(value)]
    assert main([*args, *flags]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def reference_state(model_dir: str, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The reference a checkpoint holds (``reference.safetensors``), as a full state dict (tied weights twice)."""
    module = load_model(model_dir)
    load_module_state(module, checkpoint, "reference")
    return module.state_dict()


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra.keys() - TIMING:
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), (ra["step"], k)


# margin 0: on a random model every answer's confidence is about 1/|V|, so the default margin 0.01 would pass them all
CARE = ("--care_bonus", "0.5", "--care_args", "margin", "0.0", "--ref_strategy", "ema", "--ref_rate", "0.2",
        "--ref_every", "1", "--kl_coef", "0.05")


def test_ema_reference_follows_the_recursion_and_care_bonus_matches_float64(model_dir, tmp_path):
    """(1) With K = 1, after optimizer step k the reference is θ_ref,k = d·θ_ref,k−1 + (1−d)·θ_k (θ_ref,0 = θ_0):
    checked on the checkpoints of steps 1 and 2 (model and reference.safetensors) for every tensor. (2) Step 1's bonus
    is GRPO-CARE's on the step-0 batch, recomputed here: accuracy = reward ≥ 1, confidence = exp(mean answer-span
    log-prob) under the reference (= the start at step 1), in float64 from full logits; its mean is logged."""
    d = 0.8
    rows = run_cli(model_dir, tmp_path / "care", *CARE, save_every=1)
    ckpt = tmp_path / "care" / "checkpoints"
    theta0 = load_model(model_dir).state_dict()
    p1, p2 = (load_model(ckpt / f"step-{k}").state_dict() for k in (1, 2))
    r1, r2 = (reference_state(model_dir, ckpt / f"step-{k}") for k in (1, 2))
    assert [r["ref/updates"] for r in rows] == [1.0, 1.0]
    assert [r["ref/version"] for r in rows] == [0.0, 1.0]  # the reference in force at each step's scoring pass
    moved = 0.0
    for name in r1:
        torch.testing.assert_close(r1[name], d * theta0[name] + (1 - d) * p1[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(r2[name], d * r1[name] + (1 - d) * p2[name], rtol=0, atol=1e-6, msg=name)
        moved = max(moved, (r2[name] - theta0[name]).abs().max().item())
    assert moved > 1e-4, "the reference must have moved"

    tok, model = load_tokenizer(model_dir), load_model(model_dir).double()
    train_rows = make_instruction_prompts(TINY["train_prompts"], seed=0, split="train")
    chosen = [train_rows[i] for i in prompt_schedule(len(train_rows), 0, per_step=TINY["prompts_per_step"], seed=0)]
    done = sample(model.float(), tok, render_prompts(tok, [r["prompt"] for r in chosen]), n=TINY["group_size"],
                  max_new_tokens=TINY["max_new_tokens"], temperature=1.0, seed=round_seed(0, 0, 0), batch_size=64)
    model.double()
    raw = torch.tensor(score_completions(build_reward({"instructions": 1.0}), chosen, done), dtype=torch.float64)
    rollout = collate(done, tok.pad_token_id)
    with torch.no_grad():
        logp = torch.log_softmax(model(rollout.input_ids, attention_mask=rollout.attention_mask).logits.double(), -1)
    ref_logps = logp.gather(-1, rollout.labels.clamp_min(0)[..., None]).squeeze(-1) * rollout.mask
    bonus = grpo_care_bonus((raw >= 1.0).double(), ref_logps, answer_mask(tok, rollout), group_size=TINY["group_size"],
                            bonus_coef=0.5, margin=0.0)
    print(f"rewards {raw.tolist()}, bonus {bonus.tolist()}, logged {rows[0]['care_bonus']}")
    passing = raw >= 1.0
    assert 0 < (bonus > 0).sum() < passing.sum(), "some passing completions must get the bonus and some not"
    assert rows[0]["care_bonus"] == pytest.approx(bonus.mean().item(), abs=1e-6)


def test_ema_reference_resume_is_bit_identical(model_dir, tmp_path):
    """Stop after step 2 of 3, resume: the metrics, the final policy and the EMA reference (checkpointed with the
    run, and its update counter) equal those of an uninterrupted run."""
    full = run_cli(model_dir, tmp_path / "full", *CARE, "--ref_every", "2", steps=3, save_every=1)
    run_cli(model_dir, tmp_path / "part", *CARE, "--ref_every", "2", "--stop_after", "2", steps=3,
            save_every=1)
    resumed = run_cli(model_dir, tmp_path / "part", *CARE, "--ref_every", "2", "--resume", steps=3,
                      save_every=1)
    assert_same_run(full, resumed)
    assert [r["ref/updates"] for r in full] == [0.0, 1.0, 0.0]  # every 2 optimizer steps
    for name in ("model.safetensors", "reference.safetensors"):
        a = weights(tmp_path / "full" / "checkpoints" / "step-3" / name)
        b = weights(tmp_path / "part" / "checkpoints" / "step-3" / name)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_drop_uniform_groups_without_refill_keeps_them_out_of_the_loss(model_dir, tmp_path):
    """DAPO's dynamic sampling without refill (``drop_uniform_groups`` alone, as before): one round, and the groups
    left out of the loss are exactly the batch's uniform groups."""
    rows = run_cli(model_dir, tmp_path / "dapo0", "--drop_uniform_groups", "--loss", "dapo")
    for r in rows:
        assert r["refill_rounds"] == 0.0
        assert r["out_of_loss_groups"] == r["dropped_groups"] == r["uniform_groups"] * TINY["prompts_per_step"]
        assert r["refilled_groups"] == 0
    assert max(r["uniform_groups"] for r in rows) > 0, "the test needs a uniform group"


def test_refill_replaces_dropped_groups_and_resumes_bit_identically(model_dir, tmp_path):
    """DAPO's dynamic sampling plus the difficulty band [0.25, 0.75] (pass = reward ≥ 0.5) with up to 3 refill rounds
    from a pool of 32 prompts: every group left in the loss is mixed, so the batch's uniform groups are among those
    still out of the loss, which remain only after the last round; every dropped group of round 0 was either refilled
    or is still out of the loss; some slots were refilled. A run stopped after step 1 and resumed draws the same
    refills (prompts and seeds are functions of (seed, step, round)) — same metrics, same final weights."""
    flags = ("--drop_uniform_groups", "--difficulty_low", "0.25", "--difficulty_high", "0.75", "--pass_threshold",
             "0.5", "--loss", "dapo")
    kw = dict(max_refill_rounds=3, steps=3, save_every=1, train_prompts=32, max_new_tokens=24)
    full = run_cli(model_dir, tmp_path / "full", *flags, **kw)
    print([{k: r[k] for k in ("refill_rounds", "dropped_groups", "refilled_groups", "out_of_loss_groups",
                              "uniform_groups")} for r in full])
    assert sum(r["refilled_groups"] for r in full) > 0, "the test needs a refill that found a kept group"
    for r in full:
        assert r["uniform_groups"] * TINY["prompts_per_step"] <= r["out_of_loss_groups"]
        assert r["out_of_loss_groups"] == 0 or r["refill_rounds"] == 3  # still dropped only after the last round
        assert r["refilled_groups"] + r["out_of_loss_groups"] <= r["dropped_groups"]
    run_cli(model_dir, tmp_path / "part", *flags, "--stop_after", "1", **kw)
    resumed = run_cli(model_dir, tmp_path / "part", *flags, "--resume", **kw)
    assert_same_run(full, resumed)
    a, b = weights(tmp_path / "full" / "final" / "model.safetensors"), weights(tmp_path / "part" / "final" /
                                                                              "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("overrides, message", [
    (dict(care_bonus=0.5), "ref_strategy: ema"),
    (dict(max_refill_rounds=2), "nothing is dropped"),
    (dict(difficulty_low=0.8, difficulty_high=0.2), "difficulty_low"),
    (dict(ref_strategy="ema", lora=True), "lora"),
    (dict(ref_strategy="reset"), "ref_every"),
    (dict(ref_strategy="fixed", ref_rate=0.5), "ref_rate"),
    (dict(ref_strategy="soup", ref_soup=["a"]), "ref_soup"),
    (dict(care_bonus=0.5, ref_strategy="ema", care_args={"lam": 1.0}), "care_args"),
    (dict(loss="astar_po", group_size=1, drop_uniform_groups=True), "group_size 1"),
    (dict(loss="grpo", group_size=1), "group_size"),
    (dict(astar_value_beta=0.0), "astar_value_beta"),
    (dict(loss="troll", loss_args={"max_support": 8, "bogus": 1}), "not hyperparameters of 'troll'"),
    (dict(loss="troll", loss_args={"max_support": 0}), "loss_args.max_support"),
    (dict(loss="critical_token_kl", loss_args={"ref_temperature": -1.0}), "loss_args.ref_temperature"),
])
def test_config_errors_name_the_field(overrides, message):
    from tether.recipes.configs import RLConfig

    with pytest.raises(ValueError, match=message):
        RLConfig(**overrides)
