"""Every shipped config runs through the CLI (``tether.cli.main``), shrunk to a tiny model and a few steps.

The configs are globbed, so a new ``configs/*.yaml`` is covered without touching this file. Each config is run
as shipped — same YAML, same data files, from the repository root — with only the overrides that make it tiny
(``tiny_overrides`` below: the model, output paths, step/sample counts, no progress bars or TensorBoard). Which
command a config belongs to is read from its usage comment (``tether dpo --config configs/x.yaml``), or, failing that,
from the one command whose config dataclass has every field of the file.

Data files named in a config are used as shipped; one that does not exist (yet) is replaced by a small stand-in
in tmp (with the same fields: prompt/chosen/rejected/n_constraints, or prompt), and the test says so in its
output.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from tether.cli import _commands, main
from tether.testing import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DATA_FIELDS = {"train_file": "pairs", "eval_prompts_file": "prompts", "prompts_file": "prompts"}


def tiny_overrides(command: str, model: str, out: Path) -> dict:
    """Field → value that shrink a run of ``command``; fields the command's config lacks are left out."""
    table = {
        "dpo": {"model": model, "output_dir": out, "max_steps": 2, "progress": False, "tensorboard": False,
                "kl_samples_per_prompt": 1, "kl_max_new_tokens": 4},
        # 8 prompts × 8 samples of 16 tokens: a random tiny model's samples rarely differ in rule reward
        # (commas, word counts), so fewer samples can leave no preference pair at all.
        "quickstart": {"model": model, "output_dir": out, "train_prompts": 8, "heldout_prompts": 2,
                       "samples_per_prompt": 8, "max_new_tokens": 16, "kl_samples_per_prompt": 1,
                       "progress": False},
        "rl": {"model": model, "output_dir": out, "steps": 2, "prompts_per_step": 2, "group_size": 2,
               "max_new_tokens": 8, "train_prompts": 4, "eval_prompts": 2, "eval_samples_per_prompt": 1,
               "kl_samples_per_prompt": 1, "progress": False, "tensorboard": False},
        # ref_model: adpa's reference teacher (the tiny model, as the DPO teacher: advantages 0, the run still whole)
        "distill": {"teacher_model": model, "ref_model": model, "output_dir": out, "steps": 2, "batch_size": 2,
                    "max_new_tokens": 6, "kl_samples_per_prompt": 1, "eval_samples_per_prompt": 1,
                    "progress": False, "tensorboard": False},
        "kl": {"policy": model, "reference": model, "samples_per_prompt": 1, "max_new_tokens": 4,
               "output": out / "kl_report.json"},
        "sample": {"model": model, "output_dir": out, "n": 2, "base_samples": 1, "max_new_tokens": 6,
                   "progress": False},
        # every declared point, each tiny: runs of one step, 2 prompts × 2 samples of 4 tokens per policy
        "frontier": {"model": model, "output_dir": out, "max_prompts": 2, "max_new_tokens": 4, "samples_per_prompt": 2,
                     "base_samples": 1, "progress": False, "dpo_overrides": {"max_steps": 1, "batch_size": 2},
                     "rl_overrides": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4,
                                      "train_prompts": 4}},
        # two copies of the tiny model (identical task vectors: SLERP's linear limit), KL on 1 sample of 4 tokens
        "merge": {"models": [model, model], "base": model, "output_dir": out, "kl_samples_per_prompt": 1,
                  "kl_max_new_tokens": 4},
    }
    assert command in table, f"no tiny overrides for `tether {command}`: add them to tiny_overrides in {__file__}"
    cls = _commands()[command][0]
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in table[command].items() if k in names}


def as_flags(values: dict) -> list[str]:
    """tyro with use_underscores=True: --field value; booleans are --field / --no_field; lists --field a b; dicts
    --field key value key value."""
    argv = []
    for name, value in values.items():
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no_{name}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{name}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{name}", *(str(x) for kv in value.items() for x in kv)]
        else:
            argv += [f"--{name}", str(value)]
    return argv


def command_of(config: Path) -> str:
    commands = _commands()
    m = re.search(r"tether (\w+) --config configs/" + re.escape(config.name), config.read_text())
    if m:
        return m.group(1)
    keys = set(yaml.safe_load(config.read_text()) or {})
    fits = [c for c, (cls, _) in commands.items() if keys <= {f.name for f in fields(cls)}]
    assert len(fits) == 1, f"{config}: cannot tell which command it is for ({fits}); add a usage comment"
    return fits[0]


def stand_in(kind: str, path: Path) -> Path:
    if kind == "pairs":
        rows = [{"prompt": f"Write about topic {i}. Do not use commas.", "chosen": f"Topic {i} is nice and calm.",
                 "rejected": f"Topic {i}, well, is fine, I think.", "n_constraints": 1 + i % 3} for i in range(20)]
    else:
        rows = [{"prompt": f"Describe item {i} in one sentence."} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    """Configs name data files relative to the repository root; run there, one thread (tiny matmuls on 2 shared
    cores spend their time in OpenMP barriers otherwise)."""
    monkeypatch.chdir(ROOT)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_configs_exist():
    assert len(CONFIGS) >= 6, CONFIGS


def _n_rows(path) -> int:
    return sum(1 for line in Path(path).read_text().splitlines() if line.strip())


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_runs_tiny_through_the_cli(config, tiny_dir, tmp_path, capsys):
    command = command_of(config)
    shipped = yaml.safe_load(config.read_text()) or {}
    out = tmp_path / "out"
    values = tiny_overrides(command, tiny_dir, out)
    if shipped.get("overlong_buffer"):  # must stay below the tiny max_new_tokens
        values["overlong_buffer"] = values["max_new_tokens"] // 2
    for name, kind in DATA_FIELDS.items():
        if name in shipped and not (ROOT / shipped[name]).is_file():
            values[name] = stand_in(kind, tmp_path / f"{name}.jsonl")
            warnings.warn(f"{config.name}: {shipped[name]} is not in the repository; ran with a stand-in {name}",
                          stacklevel=1)
    data = {name: values.get(name, shipped.get(name)) for name in DATA_FIELDS}

    rc = main([command, "--config", str(config.relative_to(ROOT)), *as_flags(values)])
    captured = capsys.readouterr()
    assert rc == 0, f"{config.name}: exit {rc}\n{captured.err[-3000:]}"

    if command == "dpo":
        assert (out / "final" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()
        steps = [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
        assert steps == [1, 2], steps
        if data["eval_prompts_file"]:
            report = json.loads((out / "kl_report.json").read_text())
            n_prompts = _n_rows(data["eval_prompts_file"])
            assert report["prompts"] == n_prompts and report["completions"] == n_prompts * 1
            assert math.isfinite(report["sequence_kl_rao_blackwell"]["mean"])
        else:
            assert not (out / "kl_report.json").exists()
    elif command == "quickstart":
        report = json.loads((out / "quickstart_report.json").read_text())
        assert report["pairs"] >= 1, "no preference pairs: raise the tiny samples_per_prompt"
        assert (out / "quickstart.png").stat().st_size > 1000
        batch_size, epochs = report["config"]["batch_size"], report["config"]["epochs"]
        assert len(report["train_metrics"]) == epochs * math.ceil(report["pairs"] / batch_size)
        assert _n_rows(out / "dpo" / "metrics.jsonl") == len(report["train_metrics"])
        assert (out / "dpo" / "final" / "model.safetensors").is_file()
        assert report["kl"]["completions"] == 2 * 1
    elif command == "merge":  # every input is the same model: the merge is that model, at KL 0 to each input
        report = json.loads((out / "merge_report.json").read_text())
        assert (out / "model.safetensors").is_file()
        assert set(report["kl_to"]) == {str(values["models"][0]), "base:" + str(values["base"])}
        assert all(r["token_kl"]["mean"] == 0.0 for r in report["kl_to"].values())
    elif command == "kl":
        report = json.loads((out / "kl_report.json").read_text())
        n_prompts = _n_rows(data["prompts_file"])
        assert report["prompts"] == n_prompts and report["completions"] == n_prompts
        # policy and reference are the same model: the KL is exactly 0
        assert report["token_kl"]["mean"] == 0.0 and report["sequence_kl_rao_blackwell"]["mean"] == 0.0
    elif command == "rl":
        steps = [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
        assert steps == [0, 1, 2], steps  # 0: the held-out reward before training
        assert (out / "final" / "model.safetensors").is_file()
        report = json.loads((out / "rl_report.json").read_text())
        assert report["reward_before"]["n"] == report["reward_after"]["n"] == 2 * 1
        assert report["kl"]["completions"] == 2 * 1 and math.isfinite(report["kl"]["token_kl"]["mean"])
    elif command == "distill":
        steps = [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
        assert steps == [1, 2], steps
        assert (out / "final" / "model.safetensors").is_file()
        report = json.loads((out / "distill_report.json").read_text())
        n_prompts = _n_rows(data["eval_prompts_file"])
        for when in ("before", "after"):
            for direction in ("kl_student_teacher", "kl_teacher_student"):
                assert report[when][direction]["completions"] == n_prompts
                assert math.isfinite(report[when][direction]["token_kl"]["mean"])
    elif command == "sample":
        from tether.recipes.analysis_configs import SampleConfig
        from tether.recipes.sample import settings

        report = json.loads((out / "sample_report.json").read_text())
        combos = settings(SampleConfig(**{**shipped, "n": [2]}))
        n_prompts = _n_rows(data["prompts_file"])
        assert report["prompts"] == n_prompts and len(report["results"]) == len(combos)
        assert _n_rows(out / "samples.jsonl") == n_prompts * len(combos)
        for s in report["results"]:
            assert s["reward"]["n"] + s["reward"]["not_applicable"] == n_prompts
            if s["method"] == "plain":
                assert s["kl"]["exact"]["mean"] == 0.0
            if s["method"] == "best_of_n":
                assert s["kl"]["bound"]["mean"] == pytest.approx(math.log(2) - 0.5, abs=1e-12)
    elif command == "frontier":
        from tether.recipes.analysis_configs import FrontierConfig
        from tether.recipes.frontier import declared_points

        report = json.loads((out / "frontier.json").read_text())
        specs = declared_points(FrontierConfig(**{**shipped, **values}))
        assert [p["label"] for p in report["points"]] == [s.label for s in specs]
        assert report["computed"] == len(specs) and report["cached"] == 0
        for p in report["points"]:
            per_prompt = 1 if p["method"] in ("best_of_n", "tilted") else 2
            assert p["reward"]["n"] + p["reward"]["not_applicable"] == 2 * per_prompt, p["label"]
            assert math.isfinite(p["sequence_kl"]["mean"]) and math.isfinite(p["token_kl"]["mean"]), p["label"]
            if p["method"] == "best_of_n" and p["params"]["n"] == 1:
                assert abs(p["sequence_kl"]["mean"]) < 1e-12  # best-of-1 is π_ref
        assert (out / "frontier.png").stat().st_size > 1000
    else:
        pytest.fail(f"no output checks for `tether {command}`")


# ----------------------------------------------------------------------------------------------------- errors


def test_boolean_flags_are_rendered_with_underscores():
    from tether.cli import load_config
    from tether.recipes.preference import PreferenceConfig

    cfg = load_config(PreferenceConfig, None, ["--no_progress", "--no_tensorboard", "--lora"], prog="tether dpo")
    assert (cfg.progress, cfg.tensorboard, cfg.lora) == (False, False, True)
    cfg = load_config(PreferenceConfig, None, ["--no-progress"], prog="tether dpo")
    assert cfg.progress is False


def test_help_exits_0_and_lists_the_flags(capsys):
    assert main(["dpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--no_progress" in out and "--loss_args" in out, out


def test_out_of_range_value_exits_2_naming_the_field(capsys):
    rc = main(["dpo", "--config", str(ROOT / "configs" / "dpo_smollm2.yaml"), "--lr", "-1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "lr=-1" in err and "out of range" in err, err


def test_unknown_yaml_field_names_the_file_and_the_field(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("train_file: x.jsonl\nlearning_rate: 1.0e-5\n")
    rc = main(["dpo", "--config", str(config)])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(config) in err and "learning_rate" in err, err


def test_unknown_command_exits_2(capsys):
    assert main(["dpoo", "--lr", "1"]) == 2
    assert "unknown command 'dpoo'" in capsys.readouterr().err
