"""The online-RL recipe end to end on tiny models: exact KL logging, resume, micro-batch invariance, every objective,
sandboxed rewards during training, config errors and the vLLM message.

Models are ``tether.testing`` tiny Llamas written to disk. Their byte-level completions are noise, so the tests
reward a property every completion has in some degree (the share of vowels) — groups then differ and advantages are
non-zero. Oracles are computed independently of the recipe: full-logit forward passes in float64.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tether.checkpoints import latest_checkpoint
from tether.cli import main
from tether.logprobs import IGNORE_INDEX
from tether.losses.policy.registry import ONLINE_OBJECTIVES
from tether.models import load_model, load_tokenizer
from tether.recipes.online_rl import RLConfig, prompt_schedule, train
from tether.rewards import CodeTestReward
from tether.rollout import collate
from tether.sampling import render_prompts, sample
from tether.tasks import make_instruction_prompts
from tether.testing import make_tiny_model_dir

TIMING_KEYS = {"gen_s", "reward_s", "score_s", "update_s", "gen_tokens_per_s"}


def vowel_share(prompt: str, completion: str, row: dict) -> float:
    return sum(ch in "aeiouAEIOU" for ch in completion) / max(len(completion), 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("rl") / "m", seed=0))


def tiny(model_dir: str, out: Path, **overrides) -> RLConfig:
    values = dict(output_dir=str(out), model=model_dir, steps=3, prompts_per_step=2, group_size=4, max_new_tokens=10,
                  train_prompts=8, eval_prompts=0, progress=False, tensorboard=False, lr=3e-3, micro_batch_size=8)
    values.update(overrides)
    return RLConfig(**values)


def trajectory(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in metrics]


def step_oracle(cfg: RLConfig, policy, ref, step: int) -> list[dict[str, torch.Tensor]]:
    """Redraw step ``step``'s completions with ``policy`` (the weights that sampled them: same seeds) and compute,
    per completion and in float64 from full logits one unpadded sequence at a time, the sampled tokens' log-probs
    under policy and reference (``lp``, ``lr``), the exact KL(π‖π_ref) and the entropy of π at each position."""
    tok = load_tokenizer(cfg.model)
    rows = make_instruction_prompts(cfg.train_prompts, seed=cfg.seed, split="train")
    chosen = prompt_schedule(len(rows), step, per_step=cfg.prompts_per_step, seed=cfg.seed)
    ids = render_prompts(tok, [rows[i]["prompt"] for i in chosen])
    done = sample(policy.float(), tok, ids, n=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                  temperature=cfg.temperature, seed=cfg.seed * 100_003 + step, batch_size=cfg.sample_batch_size)
    policy, ref = policy.double(), ref.double()
    out = []
    with torch.no_grad():
        for p, c in zip(done.prompt_ids, done.completion_ids):
            x = torch.tensor([p + c])
            lp = F.log_softmax(policy(x).logits[0, len(p) - 1:-1].double(), -1)
            lr = F.log_softmax(ref(x).logits[0, len(p) - 1:-1].double(), -1)
            y = torch.tensor(c)[:, None]
            out.append({"lp": lp.gather(-1, y)[:, 0], "lr": lr.gather(-1, y)[:, 0],
                        "kl": (lp.exp() * (lp - lr)).sum(-1), "entropy": -(lp.exp() * lp).sum(-1)})
    return out


def per_token_mean(parts: list[dict], key: str) -> float:
    return float(sum(p[key].sum() for p in parts) / sum(p[key].numel() for p in parts))


def test_logged_kl_and_entropy_are_those_of_the_sampling_policy(model_dir, tmp_path):
    """Step 2 logs the exact token-level KL(π‖π_ref) and the entropy of the policy that sampled it (the weights
    after step 1), on the one-update path (both from the update pass) and the off-policy path (the scoring pass).
    Oracle: reload those weights, redraw the same completions (same seed), and compute both from full logits in
    float64. fp32 forward passes of the tiny model agree with float64 to ~1e-6 per log-prob, hence rel 1e-3 on a
    KL of ~1e-3."""
    for off_policy in (False, True):
        extra = dict(ppo_epochs=2, mini_batches=2) if off_policy else {}
        out = tmp_path / f"kl{off_policy}"
        cfg = tiny(model_dir, out, steps=2, save_every=1, **extra)
        metrics = train(cfg, reward=vowel_share).metrics
        parts = step_oracle(cfg, load_model(out / "checkpoints" / "step-1"), load_model(model_dir), step=1)
        expected_kl, expected_h = per_token_mean(parts, "kl"), per_token_mean(parts, "entropy")
        print(f"off_policy={off_policy}: token KL {metrics[-1]['token_kl']:.6e} vs {expected_kl:.6e}, "
              f"entropy {metrics[-1]['entropy']:.6f} vs {expected_h:.6f}")
        assert expected_kl > 1e-4, "the policy must have moved for this test to mean anything"
        assert metrics[-1]["token_kl"] == pytest.approx(expected_kl, rel=1e-3, abs=1e-6)
        assert metrics[-1]["entropy"] == pytest.approx(expected_h, rel=1e-5)


def test_resume_gives_the_uninterrupted_trajectory(model_dir, tmp_path):
    """Off-policy mini-batches, adaptive KL coefficient and a reference reset: stop after step 2, resume, and the
    metrics and final weights equal those of a run that never stopped."""
    extra = dict(steps=4, ppo_epochs=2, mini_batches=2, kl_estimator="k2", target_kl=0.001, kl_horizon=10.0,
                 ref_strategy="reset", ref_every=3, save_every=1)
    full = train(tiny(model_dir, tmp_path / "full", **extra), reward=vowel_share)
    part = train(tiny(model_dir, tmp_path / "part", stop_after=2, **extra), reward=vowel_share)
    assert part.steps == 2
    resumed = train(tiny(model_dir, tmp_path / "part", resume=True, **extra), reward=vowel_share)
    a, b = trajectory(full.metrics), trajectory(resumed.metrics)
    assert [r["step"] for r in a] == [1, 2, 3, 4] == [r["step"] for r in b]
    assert len({r["kl_coef"] for r in a}) > 1, "the adaptive coefficient should have moved"
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), (ra["step"], k)
    wa, wb = load_model(tmp_path / "full" / "final"), load_model(tmp_path / "part" / "final")
    for (name, pa), pb in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("rl_ref") / "m", seed=1))


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_micro_batches_do_not_change_the_update(model_dir, other_model_dir, tmp_path, loss):
    """micro_batch_size is a memory knob: 4 or 8 sequences per forward give the same step (GRPO's
    seq-mean-token-mean and DAPO's token-mean shares, with a k3 KL term to a *different* reference so that the KL
    term and its gradient are not zero at the first step). A wrong share scales the loss and the gradient norm by
    O(1); float rounding of the two batchings moves them by ~1e-7 relative, so 1e-5 relative has 100× margin.

    One step only: after it, Adam turns rounding-sized differences in near-zero gradient coordinates into
    differences of order lr·1e-3 in the weights, which the next step's metrics would inherit on some CPUs and not
    others (a 1.05e-5 relative gap in step 2's token KL was seen on an AMD EPYC)."""
    runs = []
    for size in (8, 4):
        runs.append(train(tiny(model_dir, tmp_path / f"{loss}{size}", steps=1, micro_batch_size=size, loss=loss,
                               kl_coef=0.1, kl_estimator="k3", ref_model=other_model_dir),
                          reward=vowel_share).metrics)
    (a,), (b,) = runs
    assert a["kl_term"] > 1e-3 and a["grad_norm"] > 0, "the KL term must be far from zero for the test to mean much"
    for key in ("grad_norm", "loss", "kl_term", "token_kl", "entropy"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), key


def test_shared_prompts_do_not_change_training(model_dir, tmp_path):
    """share_prompts (each prompt through the backbone once) is a speed knob: over two off-policy steps (scoring pass
    + two mini-batches, exact KL in the loss) every logged metric — losses, exact KL, gradient norms, which depend on
    the previous updates — matches the plain forward. The two forwards batch their products differently, so they
    agree to float rounding, and Adam's first steps move coordinates whose gradients are rounding-sized by ±lr: at
    lr 3e-3 that shifts the second step's gradient norm by ~1e-3, so this test trains at lr 3e-4, where the metrics
    agree to 1e-6. (tests/test_prefix.py compares values and gradients of the two forwards directly.)"""
    runs = []
    for share in (True, False):
        result = train(tiny(model_dir, tmp_path / f"share{share}", steps=2, share_prompts=share, mini_batches=2,
                            kl_coef=0.1, kl_estimator="exact", lr=3e-4), reward=vowel_share)
        runs.append(trajectory(result.metrics))
    assert len(runs[0]) == len(runs[1]) == 2
    for a, b in zip(*runs):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("loss", sorted(ONLINE_OBJECTIVES))
def test_every_objective_trains(model_dir, tmp_path, loss):
    """Each objective of the table runs through the recipe, moves the weights, and the first update of an on-policy
    step sees ratio 1 (old log-probs are the policy's own); step 2 logs a positive exact KL exactly when step 1
    changed the weights."""
    reward = vowel_share
    if loss == "disco":  # DisCO needs a binary verifier; alternating 1/0 makes every group mixed
        calls = itertools.count()

        def reward(prompt, completion, row):
            return float(next(calls) % 2)
    result = train(tiny(model_dir, tmp_path / loss, steps=2, loss=loss), reward=reward)
    for row in result.metrics:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        if "ratio_mean" in row:
            assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    start, final = load_model(model_dir).state_dict(), load_model(tmp_path / loss / "final").state_dict()
    assert max((final[k] - start[k]).abs().max().item() for k in start) > 1e-5
    first, second = result.metrics
    assert second["token_kl"] > 0 if first["grad_norm"] > 0 else second["token_kl"] == 0  # KL iff step 1 moved


def step1_weights(out: Path, model_dir: str, lora: bool):
    """The policy after step 1 (it sampled step 2): the step-1 checkpoint, with LoRA its adapter merged."""
    if not lora:
        return load_model(out / "checkpoints" / "step-1")
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(model_dir), out / "checkpoints" / "step-1").merge_and_unload()


@pytest.mark.parametrize("extra", [
    dict(kl_placement="reward", kl_estimator="k1", kl_coef=0.1, advantage="reinforce_pp"),
    dict(kl_placement="reward", kl_estimator="k3", kl_coef=0.1),
    dict(kl_estimator="exact", kl_coef=0.1),
    dict(kl_estimator="k3_is", kl_coef=0.1),
    dict(kl_estimator="k2", kl_coef=0.1, lora=True, lr=1e-2),
], ids=["reward-k1", "reward-k3", "loss-exact", "loss-k3_is", "loss-k2-lora"])
def test_kl_placements_log_the_exact_values(model_dir, tmp_path, extra):
    """Every KL placement logs, at step 2, the value its formula gives on the completions the step-1 policy drew:
    in the reward, β·mean_i Σ_t k(log π, log π_ref) subtracted from the sequence rewards; in the loss (one
    on-policy update, so the importance weight of k3_is is 1), GRPO's seq-mean-token-mean of the per-token
    estimate (the exact KL for ``exact``). Oracle: ``step_oracle`` in float64; the estimators are tether.kl's
    (tested on their own by exact enumeration in tests/test_kl.py)."""
    from tether import kl as K

    out = tmp_path / "run"
    cfg = tiny(model_dir, out, steps=2, save_every=1, **extra)
    metrics = train(cfg, reward=vowel_share).metrics
    parts = step_oracle(cfg, step1_weights(out, model_dir, cfg.lora), load_model(model_dir), step=1)
    assert metrics[-1]["token_kl"] == pytest.approx(per_token_mean(parts, "kl"), rel=1e-3, abs=1e-6)
    assert per_token_mean(parts, "kl") > 1e-4, "the policy must have moved for this test to mean anything"
    name = cfg.kl_estimator.removesuffix("_is")
    per_token = [p["kl"] if name == "exact" else getattr(K, name)(p["lp"], p["lr"]) for p in parts]
    if cfg.kl_placement == "reward":
        expected = cfg.kl_coef * float(torch.stack([k.sum() for k in per_token]).mean())
        assert "kl_term" not in metrics[-1]
        assert metrics[-1]["reward_kl_penalty"] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    else:
        expected = float(torch.stack([k.mean() for k in per_token]).mean())  # seq-mean-token-mean
        assert metrics[-1]["kl_term"] == pytest.approx(expected, rel=1e-3, abs=1e-7)


def test_sandboxed_code_reward_failures_do_not_stop_training(model_dir, tmp_path):
    """Model-written code that loops forever, allocates without bound or crashes the interpreter scores 0 within the
    time limit, and training goes on. The completion picks the program (by its length) so every kind occurs."""
    programs = ["while True:\n    pass\n", "x = bytearray(1 << 34)\nf = lambda: 1\n", "import os\nos.abort()\n",
                "def f():\n    return 1\n"]
    code_reward = CodeTestReward(timeout_s=1.0, memory_mb=256)
    seen: dict[int, list[tuple[float, float]]] = {}

    def reward(prompt, completion, row):
        kind = len(completion) % len(programs)
        fenced = f"```python\n{programs[kind]}```"
        t0 = time.perf_counter()
        score = code_reward(prompt, fenced, {"tests": ["assert f() == 1"]})
        seen.setdefault(kind, []).append((score, time.perf_counter() - t0))
        return score

    result = train(tiny(model_dir, tmp_path / "code", steps=3, prompts_per_step=2, group_size=4), reward=reward)
    assert result.steps == 3 and (tmp_path / "code" / "final").is_dir()
    assert sum(len(v) for v in seen.values()) == 3 * 2 * 4
    for kind, calls in seen.items():
        for score, seconds in calls:
            assert score == (1.0 if kind == 3 else 0.0), (kind, score)
            assert seconds < 1.0 + 3.0, (kind, seconds)  # the limit plus process start-up
    assert {0, 1, 2} <= set(seen), f"completion lengths gave kinds {sorted(seen)}; the test needs every failure"


def test_collate_aligns_labels_and_sampler_logps():
    from tether.sampling import Completions

    done = Completions(prompt_index=[0, 0], prompt_ids=[[5, 6, 7], [5, 6, 7]], completion_ids=[[8, 9], [10]],
                       logprobs=[[-1.0, -1.0], [-1.0]], texts=["", ""], finished=[True, False])
    b = collate(done, pad_token_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 10, 0]]
    assert b.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX],
                                    [IGNORE_INDEX, IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX]]
    assert b.mask.sum().item() == 3
    assert b.sampler_logps.tolist() == [[0, 0, -1.0, -1.0, 0], [0, 0, -1.0, 0, 0]]


@pytest.mark.parametrize("overrides, message", [
    (dict(loss="nope"), "unknown objective"),
    (dict(loss_args={"clip_eps": 0.2, "bogus": 1}), "not hyperparameters of 'grpo'"),
    (dict(loss="rpg", kl_coef=0.1), "carries its own KL"),
    (dict(kl_placement="reward", kl_estimator="exact"), "cannot be placed in the reward"),
    (dict(rewards={"vibes": 1.0}), "unknown reward"),
    (dict(group_size=1), "group_size"),
    (dict(prompts_per_step=3, mini_batches=2), "must divide"),
    (dict(loss_args={"agg": "mean"}), "not one of"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        RLConfig(**overrides)


def test_vllm_engine_without_vllm_is_one_clear_line(model_dir, tmp_path, capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    code = main(["rl", "--model", model_dir, "--output_dir", str(tmp_path / "v"), "--engine", "vllm",
                 "--eval_prompts", "0", "--train_prompts", "4", "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "needs the vllm package" in err[0] and "engine='tether'" in err[0]


def test_gradient_checkpointing_does_not_change_rl_updates(model_dir, tmp_path):
    finals = []
    for gc in (False, True):  # both on the plain forward (a checkpointed model cannot share prompts)
        train(tiny(model_dir, tmp_path / f"gc{gc}", steps=2, gradient_checkpointing=gc, share_prompts=False),
              reward=vowel_share)
        finals.append(load_model(tmp_path / f"gc{gc}" / "final").state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], rtol=1e-5, atol=1e-6)


def test_fresh_run_replaces_an_earlier_runs_checkpoints(model_dir, tmp_path, capsys):
    """A 4-step run leaves step-3 and step-4 in the directory; a fresh run there is refused unless it says
    overwrite; a fresh 2-step run with overwrite must keep its own step-1
    and step-2 (not be pruned in favour of the old higher steps), say what it removed, and a resume must continue
    the new run (its final weights), not the old one."""
    out = tmp_path / "run"
    train(tiny(model_dir, out, steps=4, save_every=1), reward=vowel_share)
    assert latest_checkpoint(out).name == "step-4"
    with pytest.raises(ValueError, match="holds the checkpoints of an earlier run .*overwrite: true"):
        train(tiny(model_dir, out, steps=2, save_every=1, lr=1e-3), reward=vowel_share)  # not deleted unasked
    assert latest_checkpoint(out).name == "step-4"
    train(tiny(model_dir, out, steps=2, save_every=1, lr=1e-3, overwrite=True), reward=vowel_share)
    assert "removed the checkpoints of an earlier run" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    resumed = train(tiny(model_dir, out, steps=2, save_every=1, lr=1e-3, resume=True), reward=vowel_share)
    assert resumed.steps == 2
    final = load_model(out / "final").state_dict()
    for name, value in load_model(out / "checkpoints" / "step-2").state_dict().items():
        assert torch.equal(final[name], value), name


def test_reference_reset_reinitializes_the_optimizer(model_dir, tmp_path):
    """ProRL's reset (Liu et al. 2025, Sec. 3.2) makes the reference the policy *and* re-initializes the optimizer:
    the checkpoint written right after the reset at step 2 holds no AdamW moments (the step-1 one does), its saved
    reference equals its policy, and the next step's KL to that reference is computed from zero."""
    out = tmp_path / "reset"
    metrics = train(tiny(model_dir, out, steps=3, ref_strategy="reset", ref_every=2, save_every=1),
                    reward=vowel_share).metrics
    states = {k: torch.load(out / "checkpoints" / f"step-{k}" / "trainer_state.pt", weights_only=True)
              for k in (2, 3)}
    assert states[3]["optimizer"]["state"], "step 3 took an optimizer step after the reset"
    assert not states[2]["optimizer"]["state"], "the reset must clear AdamW's moments and step counts"
    from safetensors.torch import load_file

    ref = load_file(out / "checkpoints" / "step-2" / "reference.safetensors")
    policy = load_model(out / "checkpoints" / "step-2").state_dict()
    for name, value in ref.items():
        assert torch.equal(value, policy[name]), name
    assert [m["ref/updates"] for m in metrics] == [0.0, 1.0, 0.0]
    assert [(m["ref/version"], m["ref/steps_since_sync"]) for m in metrics] == [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0)]
    assert metrics[2]["token_kl"] == 0.0  # step 3 samples from the policy the reference was just reset to


def test_lora_report_measures_the_trained_adapters(model_dir, tmp_path):
    """With LoRA the reference is the policy's own base (adapters off). The final save used to merge the adapters
    into the live policy in place, so policy and reference became one model and the held-out KL read exactly 0.
    Now the report's KL equals an independent measurement of final/ against the starting model (same prompts,
    same seed), and it is not 0."""
    from tether.eval.kl import measure_kl

    out = tmp_path / "lora"
    cfg = tiny(model_dir, out, steps=2, lora=True, lr=1e-2, kl_estimator="k2", kl_coef=0.1, eval_prompts=2,
               eval_samples_per_prompt=1, kl_samples_per_prompt=2)
    report = train(cfg, reward=vowel_share).report
    rows = make_instruction_prompts(cfg.eval_prompts, seed=cfg.seed, split="heldout")
    independent = measure_kl(load_model(out / "final"), load_model(model_dir), load_tokenizer(model_dir),
                             [r["prompt"] for r in rows], samples_per_prompt=2, max_new_tokens=cfg.max_new_tokens,
                             seed=cfg.seed, batch_size=cfg.sample_batch_size, chunk_size=cfg.chunk_size)
    assert independent["token_kl"]["mean"] > 1e-4
    assert report["kl"]["token_kl"]["mean"] == pytest.approx(independent["token_kl"]["mean"], rel=1e-5)


def test_gradient_checkpointing_with_lora_gives_the_same_updates(model_dir, tmp_path):
    """Checkpointing is enabled on the base model before LoRA wraps it (as tether.models documents); the LoRA
    run's final weights match the run without checkpointing."""
    finals = []
    for gc in (False, True):
        train(tiny(model_dir, tmp_path / f"gc{gc}", steps=2, lora=True, lr=1e-2, gradient_checkpointing=gc,
                   share_prompts=False), reward=vowel_share)
        finals.append(load_model(tmp_path / f"gc{gc}" / "final").state_dict())
    start = load_model(model_dir).state_dict()
    assert max((finals[0][k] - start[k]).abs().max().item() for k in start) > 1e-5
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], rtol=1e-5, atol=1e-6)
