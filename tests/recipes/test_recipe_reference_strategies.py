"""Reference strategies in the preference recipe (``ref_strategy``; ``tether.reference.ReferenceSync``), on the tiny
models of ``tether.testing``.

* TR-DPO's hard sync at every step makes the reference the policy as it was before the step, so every step's DPO
  loss is log 2 (z = β·0) and the run equals a hand-written loop that scores the reference with a copy of the policy
  taken at the start of each step (the twin).
* An EMA reference with rate 0 never moves: the run equals the fixed reference's, though its log-probs are computed
  online at every micro-batch instead of read from the cache — the live path and the cached one agree.
* A soup of identical models is that model: the run equals the fixed reference's.
* A moving reference is checkpointed: stopped and resumed, the run equals an uninterrupted one.

Tolerances: the cached reference log-probs are summed over batches padded differently from the live ones (the cache
is filled in data order, the steps take a permutation), so the fp32 sums of up to 40 log-probs of ≈ −5.5 (|sum| ≤
220, spacing 1.5e-5) may differ by a few units in the last place: 1e-4 on a sum, β·1e-4 = 1e-5 on a margin or a
log-ratio, half of that on a loss. Where both sides use one pass (the twin) the weights agree to 1e-6.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.data import collate_preference, load_preference_dataset
from tether.models import load_model
from tether.recipes.preference import PreferenceConfig, _micro_batches, preference_step, reference_logps, train
from tether.reference import frozen_copy
from tether.testing import assert_close, make_tiny_model_dir, tiny_tokenizer
from tether.training import make_optimizer, make_scheduler, optimizer_step

ROWS = [{"prompt": f"Question {i}: name a {w}.", "chosen": f"A fine {w}, number {i}." + " Really." * (i % 3),
         "rejected": "no " * (1 + i % 4) + w}
        for i, w in enumerate(["cat", "dog", "tree", "river", "cloud", "stone", "bird", "lamp", "road", "song"])]
RUN = dict(batch_size=3, grad_accum=1, epochs=1, max_steps=3, lr=1e-3, warmup_ratio=0.0, schedule="constant",
           tensorboard=False, progress=False, max_length=256, max_prompt_length=128)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"model": str(make_tiny_model_dir(root / "m0", seed=0)), "pairs": str(pairs)}


def _run(assets, out: Path, **kw):
    return train(PreferenceConfig(train_file=assets["pairs"], model=assets["model"], output_dir=str(out), **RUN, **kw))


def _weights(out: Path) -> dict:
    return load_file(out / "final" / "model.safetensors")


def test_trdpo_hard_sync_every_step_is_dpo_against_the_previous_policy(assets, tmp_path):
    """Twin: a plain loop where step k's reference log-probs come from a frozen copy of the policy taken before
    step k (θ_{k−1}), through the recipe's own step function, optimizer and schedule. Every step's loss is log 2 and
    its margin 0 because the reference is the policy being differentiated; a fixed reference is not (control)."""
    res = _run(assets, tmp_path / "tr", ref_strategy="trdpo_hard", ref_every=1)
    assert [m["ref/version"] for m in res.metrics] == [0.0, 1.0, 2.0]  # in force at steps 1, 2, 3
    assert [m["ref/updates"] for m in res.metrics] == [1.0, 1.0, 1.0]
    for m in res.metrics:
        assert m["loss"] == pytest.approx(math.log(2), abs=1e-6) and m["margin"] == pytest.approx(0.0, abs=1e-6)
    fixed = _run(assets, tmp_path / "fixed")
    assert abs(fixed.metrics[2]["loss"] - math.log(2)) > 1e-3, "a fixed reference must differ from the twin"

    cfg = PreferenceConfig(train_file=assets["pairs"], model=assets["model"], output_dir=str(tmp_path / "x"), **RUN)
    tok = tiny_tokenizer()
    examples, _ = load_preference_dataset(assets["pairs"], tok, max_length=256, max_prompt_length=128)
    policy = load_model(assets["model"]).train()
    optimizer = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, schedule="constant", warmup_steps=0, total_steps=3)
    for step, idx in enumerate(_micro_batches(len(examples), cfg, None)[:3]):
        previous = frozen_copy(policy)  # θ_{k−1}: the reference of step k
        batch = collate_preference([examples[i] for i in idx], tok.pad_token_id)
        ref = reference_logps(previous, [examples[i] for i in idx], pad_token_id=tok.pad_token_id,
                              batch_size=len(idx), chunk_size=cfg.chunk_size)
        loss, _ = preference_step(policy, batch, cfg=cfg, ref_logps=ref)
        (loss.sum() * (1 / len(idx))).backward()
        optimizer_step(policy, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm, step=step + 1)
    trained = _weights(tmp_path / "tr")
    for name, value in policy.state_dict().items():
        if name in trained:
            assert_close(trained[name], value, name, atol=1e-6)


@pytest.mark.parametrize("loss", ["dpo", "kto", "tdpo2"])
def test_ema_rate_zero_is_the_fixed_reference_through_the_live_path(assets, tmp_path, loss):
    """DPO (summed log-probs), KTO (also its mismatched pairs' reference log-probs) and TDPO2 (the reference's full
    distribution, online in both runs)."""
    fixed = _run(assets, tmp_path / "fixed", loss=loss)
    ema0 = _run(assets, tmp_path / "ema0", ref_strategy="ema", ref_rate=0.0, loss=loss)
    assert [m["ref/version"] for m in ema0.metrics] == [0.0, 1.0, 2.0]  # it "moves" every step, to itself
    for a, b in zip(fixed.metrics, ema0.metrics):
        for key, tol in (("loss", 5e-6), ("margin", 1e-5), ("logratio", 1e-5), ("grad_norm", 1e-4)):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=tol), (a["step"], key)
    wa, wb = _weights(tmp_path / "fixed"), _weights(tmp_path / "ema0")
    for name in wa:
        assert_close(wb[name], wa[name], name, atol=1e-5)


def test_soup_of_identical_models_is_the_fixed_reference(assets, tmp_path):
    fixed = _run(assets, tmp_path / "fixed")
    soup = _run(assets, tmp_path / "soup", ref_strategy="soup", ref_soup=[assets["model"], assets["model"],
                                                                          assets["model"]])
    for a, b in zip(fixed.metrics, soup.metrics):
        assert b["loss"] == a["loss"] and b["logratio"] == a["logratio"], a["step"]
        assert b["ref/version"] == 0.0 and b["ref/rate"] == 0.0


def test_a_moving_reference_resumes_exactly(assets, tmp_path):
    """trdpo_soft (α = 0.5, τ = 2): stopped after step 2 (just after the first sync) and resumed, the metrics and the
    final weights equal an uninterrupted run's — the reference and the sync counters come back from the checkpoint."""
    kw = dict(ref_strategy="trdpo_soft", ref_rate=0.5, ref_every=2, save_every=1)
    full = _run(assets, tmp_path / "full", **kw)
    _run(assets, tmp_path / "part", stop_after=2, **kw)
    resumed = _run(assets, tmp_path / "part", resume=True, **kw)
    assert [m["ref/updates"] for m in full.metrics] == [0.0, 1.0, 0.0]
    for a, b in zip(full.metrics, resumed.metrics):
        for key in ("loss", "margin", "grad_norm", "ref/version", "ref/steps_since_sync"):
            assert b[key] == a[key], (a["step"], key)
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("kw, message", [
    (dict(ref_strategy="ema", lora=True), "lora"),
    (dict(ref_strategy="soup", ref_soup=["x"]), "ref_soup"),
    (dict(ref_strategy="ema", loss="simpo"), "reference-free"),
    (dict(ref_strategy="ema", loss="longpo"), "LongPO"),
    (dict(ref_strategy="fixed", ref_every=3), "ref_every"),
    (dict(ref_strategy="ema", ref_rate=2.0), "ref_rate"),
])
def test_bad_reference_settings_fail_at_construction(kw, message):
    with pytest.raises(ValueError, match=message):
        PreferenceConfig(train_file="x.jsonl", **kw)


# ------------------------------------------------------------------------------------------------ online RL


def _vowel_share(prompt: str, completion: str, row: dict) -> float:
    return sum(ch in "aeiouAEIOU" for ch in completion) / max(len(completion), 1)


def _rl(assets, out: Path, **kw):
    from tether.recipes.configs import RLConfig
    from tether.recipes.online_rl import train as train_rl

    cfg = RLConfig(output_dir=str(out), model=assets["model"], steps=2, prompts_per_step=2, group_size=4,
                   max_new_tokens=8, train_prompts=8, progress=False, tensorboard=False,
                   micro_batch_size=8, kl_coef=0.1, **{"eval_prompts": 0, "lr": 3e-3, **kw})
    return train_rl(cfg, reward=_vowel_share).metrics


def test_rl_soup_of_identical_models_is_the_fixed_reference_and_trdpo_hard_zeroes_the_next_steps_kl(assets, tmp_path):
    """Online RL: a soup of three copies of the start is the start (the same steps, bit for bit); TR-DPO's hard sync
    every step makes the reference the policy that samples the next step, so from step 2 on the exact KL of the
    sampled batch is 0 (step 1 samples from the start = the reference, also 0)."""
    fixed = _rl(assets, tmp_path / "fixed")
    soup = _rl(assets, tmp_path / "soup", ref_strategy="soup", ref_soup=[assets["model"]] * 3)
    for a, b in zip(fixed, soup):
        assert a["loss"] == b["loss"] and a["token_kl"] == b["token_kl"], a["step"]
    hard = _rl(assets, tmp_path / "hard", ref_strategy="trdpo_hard", ref_every=1)
    assert [m["ref/version"] for m in hard] == [0.0, 1.0] and [m["token_kl"] for m in hard] == [0.0, 0.0]
    assert fixed[1]["token_kl"] > 0, "with a fixed reference the policy of step 2 has moved away from it"


def test_rl_report_kl_of_a_moving_reference_is_to_the_start(assets, tmp_path):
    """rl_report.json's KL(trained ‖ π_ref) is to the starting model also when the reference moved: with TR-DPO's
    hard sync after every step the reference in force at the end *is* the final policy, so a KL to it would read 0
    for a policy that did move (the preference recipe measures to the starting model too)."""
    _rl(assets, tmp_path / "hard", ref_strategy="trdpo_hard", ref_every=1, eval_prompts=2, kl_samples_per_prompt=2)
    report = json.loads((tmp_path / "hard" / "rl_report.json").read_text())
    assert report["kl"]["token_kl"]["mean"] > 0


def test_rl_report_kl_of_a_soup_reference_is_to_the_start(assets, tmp_path):
    """With ``ref_strategy: soup`` of the start and a different model the reference is not where the policy started;
    the report's KL is still to the start (as tether dpo's). At lr = 1e-30 every AdamW update is below fp32's
    resolution, so the policy stays the start bit for bit: the KL is exactly 0, where a KL to the soup would not be."""
    other = make_tiny_model_dir(tmp_path / "m1", seed=1)
    _rl(assets, tmp_path / "soup", ref_strategy="soup", ref_soup=[assets["model"], str(other)], lr=1e-30,
        eval_prompts=2, kl_samples_per_prompt=2)
    report = json.loads((tmp_path / "soup" / "rl_report.json").read_text())
    assert report["kl"]["token_kl"]["mean"] == 0.0
