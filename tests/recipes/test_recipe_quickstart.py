"""The quickstart's failure modes reach the user as one line (its happy path runs in tests/test_readme.py)."""

from __future__ import annotations

import tether.recipes.quickstart as quickstart
from tether.cli import main
from tether.testing import make_tiny_model_dir


def test_no_preference_pairs_is_one_clear_line(tmp_path, capsys, monkeypatch):
    """A reward that scores every sample the same leaves no best-vs-worst pair: the command exits 2 with one line
    that says why and what to change (it used to end in a RuntimeError traceback)."""
    model = make_tiny_model_dir(tmp_path / "tiny")
    monkeypatch.setattr(quickstart, "InstructionFollowingReward", lambda: (lambda prompt, completion, row: 0.5))
    code = main(["quickstart", "--model", str(model), "--output_dir", str(tmp_path / "qs"), "--train_prompts", "2",
                 "--heldout_prompts", "1", "--samples_per_prompt", "2", "--max_new_tokens", "4", "--no_progress"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "tether quickstart" in line]
    assert code == 2
    assert len(err) == 1 and "no preference pairs" in err[0] and "samples_per_prompt" in err[0]
