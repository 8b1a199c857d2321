"""`tether frontier`'s cache and evaluator on the tiny random model: a rerun recomputes nothing cached (calls
counted), an extended sweep computes only the new points, an interrupted sweep resumes where it stopped, and
π_ref measured as a saved model sits at KL exactly 0.

The oracle for the last: a policy equal to the reference has the same next-token distribution at every position, so
every exact token KL_t is 0 and so are the token- and sequence-level figures (the same weights give bit-identical
logits)."""

import json
from pathlib import Path

import pytest
import torch

from tether.recipes import frontier
from tether.recipes.analysis_configs import FrontierConfig
from tether.testing import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("frontier")
    return str(make_tiny_model_dir(base / "ref", seed=0)), str(make_tiny_model_dir(base / "other", seed=1))


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.chdir(ROOT)  # the DPO config names its data relative to the repository root
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def config(tiny, out: Path, **changes) -> FrontierConfig:
    ref, other = tiny
    values = dict(model=ref, prompts_file="data/ifeval_heldout_prompts.jsonl", max_prompts=2, output_dir=str(out),
                  max_new_tokens=4, samples_per_prompt=2, best_of_n=[1, 2], tilted_beta=[0.5], tilted_n=2,
                  base_samples=1, dpo_config="configs/dpo_smollm2.yaml", dpo_beta=[0.1],
                  dpo_overrides={"max_steps": 1, "batch_size": 2}, models=[other, ref], progress=False)
    return FrontierConfig(**{**values, **changes})


@pytest.fixture
def calls(monkeypatch):
    """Counts of the three expensive calls of a sweep."""
    counts = {"draw_candidates": 0, "evaluate_policy": 0, "_train": 0}
    for name in counts:
        real = getattr(frontier, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(frontier, name, counted)
    return counts


def test_rerun_recomputes_nothing_and_an_extension_computes_only_the_new_points(tiny, tmp_path, calls):
    out = tmp_path / "out"
    first = frontier.run(config(tiny, out))
    # 3 inference points from one draw of candidates; the DPO run and two saved models through the evaluator.
    assert calls == {"draw_candidates": 1, "evaluate_policy": 3, "_train": 1}
    assert (first["computed"], first["cached"]) == (6, 0)
    ref_point = first["points"][-1]
    assert ref_point["method"] == "model" and ref_point["params"]["path"] == tiny[0]
    assert ref_point["sequence_kl"]["mean"] == 0.0 and ref_point["token_kl"]["mean"] == 0.0
    assert ref_point["reward"]["n"] == 2 * 2

    second = frontier.run(config(tiny, out))
    assert calls == {"draw_candidates": 1, "evaluate_policy": 3, "_train": 1}  # nothing new
    assert (second["computed"], second["cached"]) == (0, 6)
    assert [p["fingerprint"] for p in second["points"]] == [p["fingerprint"] for p in first["points"]]
    assert second["points"] == first["points"] and second["curves"] == first["curves"]

    third = frontier.run(config(tiny, out, dpo_beta=[0.1, 0.3], tilted_beta=[0.5, 2.0]))
    # The new tilted point needs the candidates again (they are not cached); one new DPO run and its evaluation.
    assert calls == {"draw_candidates": 2, "evaluate_policy": 4, "_train": 2}
    assert (third["computed"], third["cached"]) == (2, 6)
    cache = json.loads((out / "frontier_cache.json").read_text())
    assert len(cache["points"]) == 8 + 1  # 8 points and the curves
    assert not (out / "frontier_cache.json.tmp").exists()
    report = json.loads((out / "frontier.json").read_text())
    assert [p["label"] for p in report["points"]] == [
        "best-of-1", "best-of-2", "tilted β=0.5", "tilted β=2", "dpo β=0.1", "dpo β=0.3", "other", "ref"]
    assert (out / "frontier.png").stat().st_size > 1000


def test_an_interrupted_sweep_resumes_where_it_stopped(tiny, tmp_path, monkeypatch, calls):
    """The sweep is interrupted after the DPO run trained, before its evaluation ended: the inference points are in
    the cache; the rerun does not train again (the finished run's final model is reused: the recipe is called once
    in all) and evaluates the three policies (``calls`` counts the wrapped evaluator: the interruption is one
    call)."""
    import tether.recipes.preference as preference

    out = tmp_path / "out"
    counted, real_train, trained = frontier.evaluate_policy, preference.train, []
    monkeypatch.setattr(preference, "train", lambda cfg: trained.append(cfg) or real_train(cfg))

    def interrupted_once(*args, **kwargs):
        if not interrupted_once.done:
            interrupted_once.done = True
            calls["evaluate_policy"] += 1
            raise KeyboardInterrupt
        return counted(*args, **kwargs)

    interrupted_once.done = False
    monkeypatch.setattr(frontier, "evaluate_policy", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        frontier.run(config(tiny, out))
    saved = json.loads((out / "frontier_cache.json").read_text())["points"]
    assert len(saved) == 3 + 1  # the inference points and the curves, written before the stop
    assert calls == {"draw_candidates": 1, "evaluate_policy": 1, "_train": 1} and len(trained) == 1

    resumed = frontier.run(config(tiny, out))
    assert (resumed["computed"], resumed["cached"]) == (3, 3)  # the DPO point and the two saved models
    assert calls == {"draw_candidates": 1, "evaluate_policy": 4, "_train": 2} and len(trained) == 1


def test_bad_sweeps_fail_in_one_line_naming_the_field(tiny, tmp_path):
    with pytest.raises(ValueError, match="dpo_beta: the runs need a recipe config; set dpo_config"):
        FrontierConfig(dpo_beta=[0.1])
    with pytest.raises(ValueError, match="nothing to measure"):
        FrontierConfig(best_of_n=[])
    with pytest.raises(ValueError, match=r"overrides: unknown field\(s\) \['max_stepz'\]"):
        frontier.declared_points(config(tiny, tmp_path, dpo_overrides={"max_stepz": 1}))


def test_the_policy_evaluator_is_measure_kl_plus_the_reward_of_the_same_completions():
    """``evaluate_policy`` = ``measure_kl`` (tested against exact enumeration in tests/eval/test_kl_measure.py) on the
    same seeded completions, plus their rewards: the KL report is identical, and the reward summary is the mean (95%
    CI) of the reward of exactly the completions ``sample`` draws with that seed."""
    from tether.eval.kl import measure_kl
    from tether.inference.accounting import summarize_values
    from tether.sampling import render_prompts, sample
    from tether.testing import tiny_model, tiny_tokenizer

    tok, policy, reference = tiny_tokenizer(), tiny_model(seed=1), tiny_model(seed=0)
    rows = [{"prompt": "Say hi."}, {"prompt": "Name a colour, please."}]

    def reward(prompt, completion, row):  # no opinion on empty completions: counted as not applicable
        return float(len(completion) % 5) if completion else None

    got = frontier.evaluate_policy(policy, reference, tok, rows, reward, samples_per_prompt=3, max_new_tokens=5,
                                   seed=7, batch_size=4)
    want = measure_kl(policy, reference, tok, [r["prompt"] for r in rows], samples_per_prompt=3, max_new_tokens=5,
                      seed=7, batch_size=4)
    assert got["kl_report"] == want
    assert got["sequence_kl"]["mean"] == want["sequence_kl_rao_blackwell"]["mean"] > 0
    assert got["token_kl"]["mean"] == want["token_kl"]["mean"]
    done = sample(policy, tok, render_prompts(tok, [r["prompt"] for r in rows]), n=3, max_new_tokens=5,
                  temperature=1.0, seed=7, batch_size=4)
    values = [reward(None, t, None) for t in done.texts]
    assert got["reward"] == summarize_values(torch.tensor([float("nan") if v is None else v for v in values],
                                                          dtype=torch.float64))
