"""``tether rl`` with constrained rollouts (``constraint`` / ``constraint_delimiters`` in RLConfig), on a tiny
random Llama whose free completions are byte noise: every rollout the reward sees is in the grammar, the step
metrics carry the constraint's KL cost, and malformed grammars fail at config time in one line naming the field."""

from __future__ import annotations

import json
import re

import pytest

from tether.cli import main
from tether.recipes.online_rl import RLConfig, train
from tether.testing import make_tiny_model_dir

PATTERN = "[aeiou]{2,6}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("rlc") / "m", seed=0))


def tiny(model_dir, out, **overrides) -> RLConfig:
    values = dict(output_dir=str(out), model=model_dir, steps=2, prompts_per_step=2, group_size=4, max_new_tokens=10,
                  train_prompts=4, eval_prompts=0, progress=False, tensorboard=False, lr=3e-3, micro_batch_size=8)
    values.update(overrides)
    return RLConfig(**values)


def test_constrained_rollouts_are_in_the_grammar(model_dir, tmp_path):
    """Regex rollouts: all 2 steps × 8 completions full-match (the pattern needs ≤ 7 tokens of the 10, so none is
    cut); the reward (the share of 'a') is therefore computed on grammatical text only, and each step logs the
    exact KL cost of the constraint, positive since the tiny model puts mass outside [aeiou]."""
    seen: list[str] = []

    def share_of_a(prompt, completion, row):
        seen.append(completion)
        return completion.count("a") / max(len(completion), 1)

    result = train(tiny(model_dir, tmp_path / "r", constraint=f"regex:{PATTERN}"), reward=share_of_a)
    assert len(seen) == 2 * 8
    assert all(re.fullmatch(PATTERN, c) for c in seen), seen
    assert all(m["intervention_kl"] > 0 for m in result.metrics)


def test_crane_rollouts_through_the_cli(model_dir, tmp_path):
    """The same through ``tether rl`` flags, CRANE-style: free text, the grammar only
    between <answer> and </answer>."""
    code = main(["rl", "--model", model_dir, "--output_dir", str(tmp_path / "c"), "--steps", "1",
                 "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "12", "--train_prompts", "2",
                 "--eval_prompts", "0", "--no_progress", "--no_tensorboard", "--constraint", "choice:[\"ab\", \"c\"]",
                 "--constraint_delimiters", "<answer>", "</answer>"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert any("intervention_kl" in r for r in rows)


@pytest.mark.parametrize("overrides, message", [
    (dict(constraint="regex:(ab"), r"^constraint: invalid regex — .*unclosed group"),
    (dict(constraint="lark:start: foo"), r"^constraint: invalid lark — .*unknown name"),
    (dict(constraint='json_schema:{"type": "objectx"}'), r"^constraint: invalid json_schema — .*objectx"),
    (dict(constraint="json_schema:{oops"), r"^constraint: invalid json_schema — not valid JSON"),
    (dict(constraint="grammar:x"), r"^constraint: 'grammar:x' is not 'kind:spec'"),
    (dict(constraint="regex:a", engine="hf"), r"^constraint: needs engine tether"),
    (dict(constraint="regex:a", constraint_delimiters=["<"]), r"^constraint_delimiters: need \[open, close\]"),
    (dict(constraint_delimiters=["<", ">"]), r"^constraint_delimiters: set without a constraint"),
])
def test_malformed_constraint_is_a_config_error(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        RLConfig(**overrides)
    assert "\n" not in str(err.value)
