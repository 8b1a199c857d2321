"""`tether rl`'s reward transform (``reward_transform``: calibration, CTRL, vBoN against reference samples per
prompt, ``tether.inference.transforms``), applied right after the rewards are computed, on a tiny model."""

from __future__ import annotations

import pytest
import torch

from tether.inference.transforms import calibrate, ctrl_bon, vbon_reward
from tether.recipes.online_rl import RLConfig, generate, rl_step, setup
from tether.rollout import score_completions
from tether.testing import make_tiny_model_dir


def vowel_share(prompt: str, completion: str, row: dict) -> float:
    return sum(ch in "aeiouAEIOU" for ch in completion) / max(len(completion), 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("rl_transform") / "m", seed=0))


def tiny(model_dir, out, **overrides) -> RLConfig:
    values = dict(output_dir=str(out), model=model_dir, steps=1, prompts_per_step=2, group_size=4, max_new_tokens=10,
                  train_prompts=8, eval_prompts=0, progress=False, tensorboard=False, lr=3e-3, micro_batch_size=8)
    values.update(overrides)
    return RLConfig(**values)


@pytest.mark.parametrize("name,fn,args", [("calibrate", calibrate, {}), ("ctrl_bon", ctrl_bon, {"t": 3.0}),
                                          ("vbon", vbon_reward, {})])
def test_step_reward_is_the_transform_against_reference_samples(model_dir, tmp_path, name, fn, args):
    """The step's logged reward is the mean over its completions of the transform of their raw reward against the
    cached reference samples of their own prompt (recomputed here from the same seeded completions); the tables
    hold one entry per reference sample (the reward always has an opinion)."""
    cfg = tiny(model_dir, tmp_path / name, reward_transform=name, reward_transform_args={**args, "samples": 6})
    run = setup(cfg, reward=vowel_share)
    rows, done = generate(run, 0)  # the completions rl_step(run, 0) draws: same weights, same seeds
    # float32, as the batch holds rewards (ties with reference samples stay ties)
    raw = torch.tensor(score_completions(vowel_share, rows, done), dtype=torch.float32).double()
    metrics = rl_step(run, 0)
    tables = run.reward_transform.tables
    assert len(tables) == len({run.reward_transform.key(r) for r in rows})
    assert all(len(t) == 6 for t in tables.values())
    want = torch.cat([fn(raw[g * 4:(g + 1) * 4], tables[run.reward_transform.key(row)], **args)
                      for g, row in enumerate(rows)])
    assert metrics["reward"] == pytest.approx(float(want.mean()), abs=1e-6)


@pytest.mark.parametrize("overrides,message", [
    ({"reward_transform": "rank"}, "reward_transform"),
    ({"reward_transform": "calibrate", "reward_transform_args": {"t": 2.0}}, "reward_transform_args"),
    ({"reward_transform": "ctrl_bon", "reward_transform_args": {"t": -1.0}}, "t=-1.0"),
    ({"reward_transform_args": {"samples": 4}}, "without a reward_transform"),
    ({"reward_transform": "calibrate", "ref_strategy": "reset", "ref_every": 2}, "ref_strategy"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        RLConfig(**overrides)
