"""`tether sample` (``tether.recipes.sample``) end to end on a tiny random model: every method at several n on one
set of candidates, the files it writes, and the relations that hold exactly on shared candidates."""

import json
import math

import pytest

from tether.inference import laws
from tether.recipes.analysis_configs import SampleConfig
from tether.recipes.sample import run, settings
from tether.tasks import make_instruction_prompts, write_jsonl
from tether.testing import make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    write_jsonl(make_instruction_prompts(5, seed=0, split="heldout"), d / "eval.jsonl")
    write_jsonl(make_instruction_prompts(6, seed=0, split="train"), d / "train.jsonl")
    return d


def config(tiny_dir, prompts, out, **kw):
    base = dict(model=tiny_dir, prompts_file=str(prompts / "eval.jsonl"), output_dir=str(out),
                methods=["plain", "best_of_n", "worst_of_n", "soft_best_of_n", "tilted", "rejection", "qprobe"],
                n=[1, 2, 4], tau=[0.0, 0.5], beta=[0.2], base_samples=2, max_new_tokens=6, batch_size=64,
                qprobe_train_file=str(prompts / "train.jsonl"), progress=False)
    base.update(kw)
    return SampleConfig(**base)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_method_on_shared_candidates(tiny_dir, prompts, tmp_path, capsys):
    cfg = config(tiny_dir, prompts, tmp_path / "out")
    report = run(cfg)
    out = tmp_path / "out"
    rows = read_jsonl(out / "samples.jsonl")
    P, combos = 5, settings(cfg)
    assert len(combos) == 1 + 3 + 3 + 3 * 2 + 3 + 3 + 3 * 2 and len(rows) == P * len(combos)
    assert len(read_jsonl(out / "candidates.jsonl")) == P * (4 + 2)
    assert (out / "qprobe.pt").is_file() and len(report["results"]) == len(combos)
    by = {}
    for r in rows:
        key = (r["method"], r["n"], r.get("tau"), r.get("beta"))
        by.setdefault(key, {})[r["prompt_index"]] = r
    for i in range(P):
        best = [by[("best_of_n", n, None, None)][i]["reward"] for n in (1, 2, 4)]
        worst = [by[("worst_of_n", n, None, None)][i]["reward"] for n in (1, 2, 4)]
        assert best == sorted(best) and worst == sorted(worst, reverse=True), (best, worst)
        assert by[("best_of_n", 1, None, None)][i]["completion"] == by[("plain", 1, None, None)][i]["completion"]
        assert by[("qprobe", 1, 0.5, None)][i]["candidate"] == 0
    summaries = {(s["method"], s["n"], s.get("tau"), s.get("beta")): s for s in report["results"]}
    plain = summaries[("plain", 1, None, None)]
    assert plain["kl"]["exact"]["mean"] == 0.0 and plain["kl"]["exact"]["kind"] == "exact"
    for n in (1, 2, 4):
        bon = summaries[("best_of_n", n, None, None)]
        assert bon["kl"]["bound"]["mean"] == pytest.approx(laws.bon_kl_bound(n), abs=1e-12)
        assert bon["kl"]["bound"]["kind"] == "bound" and bon["kl"]["beirami_estimate"]["kind"] == "estimate"
        rewards = [by[("best_of_n", n, None, None)][i]["reward"] for i in range(P)]
        assert bon["reward"]["mean"] == pytest.approx(sum(rewards) / P, abs=1e-12)
    # The figures in the JSONL rows are the per-prompt values the summary averages.
    tilted = summaries[("tilted", 4, None, 0.2)]
    per = [by[("tilted", 4, None, 0.2)][i]["kl"]["selection_bound"] for i in range(P)]
    assert tilted["kl"]["selection_bound"]["mean"] == pytest.approx(sum(per) / P, abs=1e-12)
    assert all(0 <= v <= math.log(4) + 1e-12 for v in per)
    printed = capsys.readouterr().out
    assert "best_of_n" in printed and "beirami_estimate" in printed


def test_probe_reuse_transforms_and_ensembles(tiny_dir, prompts, tmp_path):
    """A saved probe is loaded instead of trained (same values, same selections); a reward transform and an ensemble
    run through the same path."""
    first = run(config(tiny_dir, prompts, tmp_path / "a", methods=["qprobe"], n=[4], tau=[0.5]))
    run(config(tiny_dir, prompts, tmp_path / "b", methods=["qprobe"], n=[4], tau=[0.5],
               qprobe=str(tmp_path / "a" / "qprobe.pt"), qprobe_train_file=None))
    assert not (tmp_path / "b" / "qprobe.pt").exists()
    assert read_jsonl(tmp_path / "a" / "samples.jsonl") == read_jsonl(tmp_path / "b" / "samples.jsonl")
    assert first["results"][0]["kl"].keys() == {"selection_bound"}
    calibrated = run(config(tiny_dir, prompts, tmp_path / "c", methods=["tilted", "rejection"], n=[4],
                            reward_transform="calibrate", qprobe_train_file=None))
    for s in calibrated["results"]:
        assert s["transform"] == "calibrate" and "reward_level_plugin" not in s["kl"]
    ens = run(config(tiny_dir, prompts, tmp_path / "d", methods=["best_of_n"], n=[2], ensemble="min",
                     rewards={"instructions": 1.0, "format": 1.0}, qprobe_train_file=None))
    assert ens["results"][0]["reward"]["n"] + ens["results"][0]["reward"]["not_applicable"] == 5


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="qprobe"):
        SampleConfig(methods=["qprobe"])
    with pytest.raises(ValueError, match="methods"):
        SampleConfig(methods=["beam"])
    with pytest.raises(ValueError, match="beta"):
        SampleConfig(beta=[0.0])
    with pytest.raises(ValueError, match="reward_models"):
        SampleConfig(reward_models=["a", "b"])
    with pytest.raises(ValueError, match="exclude"):
        SampleConfig(exclude=["a", ""])


def test_exclusion_is_applied_and_its_kl_cost_reported(tiny_dir, prompts, tmp_path, capsys):
    """``exclude: [e]`` on the byte-level tiny model: no candidate contains "e" (its byte token is banned at every
    step), and the report's intervention_kl is the mean over prompts of each prompt's mean per-draw cost, which is
    > 0 exactly (every step removes the mass −log(1 − p(e)) > 0 of a random model)."""
    cfg = config(tiny_dir, prompts, tmp_path / "out", methods=["plain", "best_of_n"], n=[2], base_samples=1,
                 exclude=["e"])
    report = run(cfg)
    texts = [r["completion"] for r in read_jsonl(tmp_path / "out" / "candidates.jsonl")]
    assert len(texts) == 5 * 3 and not any("e" in t for t in texts)
    cost = report["intervention_kl"]
    assert cost["kind"] == "exact" and cost["mean"] > 0 and cost["ci95_halfwidth"] >= 0
    assert cost["banned_steps"] > 0 and 0 < cost["mean_banned_mass"] < 1
    assert "exclusion's KL cost" in capsys.readouterr().out
    plain = run(config(tiny_dir, prompts, tmp_path / "plain", methods=["plain"], n=[2], base_samples=1))
    assert "intervention_kl" not in plain
