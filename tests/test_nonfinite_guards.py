"""NaN / inf injected at run time stops every command through the CLI with one line on stderr, keeps the last
checkpoint's weights finite, and writes no final model (and no report).

Injected three ways, on tiny models (``tether.testing``):

- a custom reward returning NaN at the second RL step (the guard in ``tether.rollout.score_completions``);
- a learning rate of 1e30: finite, so the config accepts it, but after one AdamW step (|Δθ| ≈ lr) the weights are
  ~1e30 and the next forward pass overflows — the guards in ``optimizer_step`` (non-finite gradient norm), the
  sampler (non-finite logits) and the checkpoint writer (non-finite weights) stop the run, whichever sees it first;
- a model directory whose weights are NaN, given to ``tether kl`` and ``tether sample``.

Non-finite β, learning rates and KL coefficients given as config values or flags are refused before any work;
``tests/test_fuzz_inputs.py`` covers those for every float field of every command.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.cli import main
from tether.testing import make_tiny_model_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    model = make_tiny_model_dir(tmp / "model", seed=0)
    teacher = make_tiny_model_dir(tmp / "teacher", seed=1)  # a distilled student must differ from its teacher
    nan_model = make_tiny_model_dir(tmp / "nan_model", seed=0)
    weights = load_file(nan_model / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: torch.full_like(v, math.nan) for k, v in weights.items()}, nan_model / "model.safetensors")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Describe item {i}."}) + "\n" for i in range(2)))
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Write about {i}.", "chosen": f"Good text {i}.",
                                         "rejected": f"Bad, {i}."}) + "\n" for i in range(8)))
    return {"model": str(model), "teacher": str(teacher), "nan_model": str(nan_model), "prompts": str(prompts),
            "pairs": str(pairs)}


def run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "%|" not in ln]  # progress bars
    assert len(err) == 1, err  # one line, no traceback
    print(err[0])
    return rc, err[0]


def assert_stopped_cleanly(out: Path, rc: int) -> None:
    """Exit 2, no final model, and every checkpoint left holds finite weights."""
    assert rc == 2
    assert not (out / "final").exists()
    for ckpt in (out / "checkpoints").glob("step-*"):
        for name, t in load_file(ckpt / "model.safetensors").items():
            assert torch.isfinite(t).all(), f"{ckpt.name}: {name} is not finite"


TINY_RL = ["--steps", "3", "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "6",
           "--train_prompts", "4", "--eval_prompts", "0", "--kl_samples_per_prompt", "1", "--save_every", "1",
           "--no_progress", "--no_tensorboard"]


def test_rl_reward_nan_at_step_2_names_the_reward_and_the_row(files, tmp_path, capsys, monkeypatch):
    from tether import cli
    from tether.recipes.online_rl import train

    calls = []

    def flaky(prompt, completion, row):
        calls.append(1)
        return math.nan if len(calls) > 4 else 0.5  # step 1 scores 2 prompts × 2 completions

    table = dict(cli._commands())
    table["rl"] = (table["rl"][0], lambda cfg: train(cfg, reward=flaky))
    monkeypatch.setattr(cli, "_commands", lambda: table)
    out = tmp_path / "rl"
    rc, err = run(["rl", "--model", files["model"], "--output_dir", str(out), *TINY_RL], capsys)
    assert "reward 'flaky' returned nan" in err and "row" in err, err
    assert_stopped_cleanly(out, rc)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-1"]


def spread(prompt: str, completion: str, row: dict) -> float:
    """A reward that differs between the tiny model's byte-noise completions, so the gradient is not zero."""
    return (sum(map(ord, completion)) % 7) / 7


@pytest.mark.parametrize("command", ["dpo", "rl", "distill"])
def test_huge_learning_rate_stops_with_the_last_checkpoint_finite(command, files, tmp_path, capsys, monkeypatch):
    from tether import cli
    from tether.recipes.online_rl import train

    table = dict(cli._commands())
    table["rl"] = (table["rl"][0], lambda cfg: train(cfg, reward=spread))
    monkeypatch.setattr(cli, "_commands", lambda: table)
    out = tmp_path / command
    common = ["--output_dir", str(out), "--lr", "1e30", "--save_every", "1", "--no_progress", "--no_tensorboard"]
    argv = {
        "dpo": ["dpo", "--model", files["model"], "--train_file", files["pairs"], "--batch_size", "2",
                "--max_steps", "4", "--kl_samples_per_prompt", "1", "--kl_max_new_tokens", "4"],
        "rl": ["rl", "--model", files["model"], *TINY_RL],
        "distill": ["distill", "--teacher_model", files["teacher"], "--model", files["model"], "--train_file",
                    files["pairs"], "--steps", "4", "--batch_size", "2", "--micro_batch_size", "2",
                    "--max_new_tokens", "4", "--eval_prompts_file", files["prompts"], "--kl_samples_per_prompt", "1",
                    "--eval_samples_per_prompt", "1"],
    }[command]
    rc, err = run([*argv, *common], capsys)
    assert "nan" in err.lower() or "inf" in err.lower() or "not finite" in err, err
    assert_stopped_cleanly(out, rc)


@pytest.mark.parametrize("command", ["kl", "sample"])
def test_a_nan_model_is_refused_and_no_report_is_written(command, files, tmp_path, capsys):
    out = tmp_path / command
    argv = {"kl": ["kl", "--policy", files["nan_model"], "--reference", files["model"], "--prompts_file",
                   files["prompts"], "--samples_per_prompt", "1", "--max_new_tokens", "4", "--output",
                   str(out / "kl.json")],
            "sample": ["sample", "--model", files["nan_model"], "--prompts_file", files["prompts"], "--output_dir",
                       str(out), "--n", "2", "--base_samples", "1", "--max_new_tokens", "4", "--no_progress"]}[command]
    rc, err = run(argv, capsys)
    assert rc == 2 and "NaN" in err, err
    assert not (out / "kl.json").exists() and not (out / "sample_report.json").exists()


def test_quickstart_huge_learning_rate_writes_no_final_model(files, tmp_path, capsys):
    """The quickstart trains with the preference recipe: the same guards stop it, before its report."""
    out = tmp_path / "qs"
    rc, err = run(["quickstart", "--model", files["model"], "--output_dir", str(out), "--train_prompts", "8",
                   "--heldout_prompts", "2", "--samples_per_prompt", "8", "--max_new_tokens", "16",
                   "--kl_samples_per_prompt", "1", "--batch_size", "2", "--lr", "1e30", "--no_progress"], capsys)
    assert rc == 2 and ("not finite" in err or "nan" in err), err
    assert not (out / "dpo" / "final").exists() and not (out / "quickstart_report.json").exists()
