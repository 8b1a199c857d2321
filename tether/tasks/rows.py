"""The prompt rows and default reward of a training run: from files, or a generated task's splits."""

from __future__ import annotations

from tether.tasks.arithmetic import make_arithmetic_prompts
from tether.tasks.instructions import make_instruction_prompts

__all__ = ["TASK_REWARDS", "task_rows"]

TASK_REWARDS = {"instructions": {"instructions": 1.0}, "arithmetic": {"math": 1.0}}
"""The rule reward (name → weight, ``tether.rewards.build_reward``) of each generated task."""


def task_rows(task: str, *, prompts_file: str | None, eval_prompts_file: str | None, train_prompts: int,
              eval_prompts: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out prompt rows: ``prompts_file`` / ``eval_prompts_file`` when given, else ``train_prompts``
    and ``eval_prompts`` rows of the generated ``task`` ('instructions' or 'arithmetic'); no held-out rows when the
    training rows come from a file without an eval file, or with ``eval_prompts`` 0."""
    from tether.data import load_prompt_rows  # noqa: PLC0415 — reads files with optional heavy readers; only here

    make = make_instruction_prompts if task == "instructions" else make_arithmetic_prompts
    train_rows = load_prompt_rows(prompts_file) if prompts_file else make(train_prompts, seed=seed, split="train")
    if eval_prompts_file:
        return train_rows, load_prompt_rows(eval_prompts_file)
    if prompts_file or eval_prompts == 0:
        return train_rows, []
    return train_rows, make(eval_prompts, seed=seed, split="heldout")
