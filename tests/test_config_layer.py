"""The one config layer (``tether.config.build_config``): YAML values and flags parsed to the same types, refused
with the same one-line messages; and the CLI's handling of expected failures (YAML, OS errors) as one line.

The generated hostile cases are in ``tests/test_fuzz_inputs.py``; these are the named examples of issue 15, each
checked for the value that comes out, not only for "no error"."""

from __future__ import annotations

import errno
import typing
from dataclasses import dataclass, field

import pytest

from tether.cli import main
from tether.config import ConfigError, build_config, parse_flags, read_yaml
from tether.recipes.analysis_configs import SampleConfig
from tether.recipes.configs import PreferenceConfig, RLConfig


def yaml_file(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_1e5_is_a_float_and_equals_the_flag(tmp_path):
    """YAML 1.1 reads `1e-5` as a string; tether reads it as the number users mean, as the flag does."""
    from_yaml = build_config(RLConfig, yaml_file(tmp_path, "lr: 1e-5\nkl_coef: 2E-3\n"))
    from_flags = build_config(RLConfig, None, ["--lr", "1e-5", "--kl_coef=2E-3"])
    assert from_yaml.lr == from_flags.lr == 1e-5 and type(from_yaml.lr) is float
    assert from_yaml.kl_coef == from_flags.kl_coef == 2e-3
    assert build_config(RLConfig, yaml_file(tmp_path, "lr: 3\n")).lr == 3.0  # an int widened for a float field


@pytest.mark.parametrize("text, message", [
    ('use_chat_template: "false"', "use_chat_template: 'false' is not true or false"),
    ('lora: "no"', "lora: 'no' is not true or false"),
    ("max_steps: 2.5", "max_steps: 2.5 is not a whole number or null"),
    ('lr: "1e-5"', "lr: '1e-5' is not a finite number"),  # quoted: the author wrote a string
    ("beta: .inf", "beta: inf is not finite"),
    ("loss_args: {label_smoothing: .nan}", "loss_args: {'label_smoothing': nan} is not finite"),
    ("max_grad_norm: -1", "max_grad_norm=-1 is out of range: allowed >= 0"),
    ("max_steps: -3", "max_steps=-3 is out of range: allowed >= 1"),
    ("batch_size: 0", "batch_size=0 is out of range: allowed >= 1"),
    ("learning_rate: 1.0e-5", "unknown field(s) ['learning_rate']"),
])
def test_bad_yaml_values_are_refused_naming_file_and_field(tmp_path, text, message):
    path = yaml_file(tmp_path, f"train_file: x.jsonl\n{text}\n")
    with pytest.raises(ConfigError) as info:
        build_config(PreferenceConfig, path, command="tether dpo")
    assert message in str(info.value) and str(path) in str(info.value), info.value
    assert "\n" not in str(info.value)


def test_a_list_field_refuses_a_scalar_string_and_takes_lists_from_yaml_and_flags(tmp_path):
    with pytest.raises(ConfigError, match=r"stop_strings: '###' is not a list of a string \(write a list"):
        build_config(RLConfig, yaml_file(tmp_path, 'stop_strings: "###"\n'))
    assert build_config(RLConfig, yaml_file(tmp_path, 'stop_strings: ["###"]\n')).stop_strings == ["###"]
    assert build_config(RLConfig, None, ["--stop_strings", "###", "END"]).stop_strings == ["###", "END"]
    cfg = build_config(SampleConfig, None, ["--n", "2", "4", "--tau", "0", "0.5", "--methods", "best_of_n", "tilted"])
    assert (cfg.n, cfg.tau, cfg.methods) == ([2, 4], [0.0, 0.5], ["best_of_n", "tilted"])
    with pytest.raises(ConfigError, match=r"n=\[2, 0\] is out of range: allowed >= 1 for each element"):
        build_config(SampleConfig, None, ["--n", "2", "0"])


def test_dict_flags_as_pairs_or_a_mapping():
    cfg = build_config(RLConfig, None, ["--loss", "dapo", "--loss_args", "clip_eps_high", "0.28"])
    assert cfg.loss_args == {"clip_eps_high": 0.28}
    assert build_config(RLConfig, None, ["--rewards", "{instructions: 1, format: 0.5}"]).rewards == {
        "instructions": 1.0, "format": 0.5}
    with pytest.raises(ConfigError, match="rewards"):
        build_config(RLConfig, None, ["--rewards", "instructions"])


def test_flags_booleans_none_and_last_value_wins():
    cfg = build_config(RLConfig, None, ["--no_progress", "--lora", "--kl_coef", "None", "--steps", "3", "--steps=4"])
    assert (cfg.progress, cfg.lora, cfg.kl_coef, cfg.steps) == (False, True, None, 4)
    assert parse_flags(RLConfig, ["--no-tensorboard", "--share-prompts", "false", "--lora", "no"]) == {
        "tensorboard": False, "share_prompts": False, "lora": False}  # YAML's words for false, unquoted
    for argv, message in ((["--steps", "2.5"], "steps: 2.5 is not a whole number"),
                          (["--lr", "inf"], "lr: inf is not finite"),
                          (["--lora", "maybe"], "lora: 'maybe' is not true or false"),
                          (["--stepz", "2"], "unknown flag --stepz (did you mean --steps"),
                          (["stray"], "unexpected argument 'stray'")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            build_config(RLConfig, None, argv)


def test_yaml_errors_name_the_file_and_line_and_execute_nothing(tmp_path):
    for text, where, what in (("steps: 2\nlr: [1e-5\n", ":3:", "YAML error"),
                              ("lr: !!python/object/apply:os.system ['touch pwned']\n", ":1:", "python/object"),
                              ("seed: 1\nseed: 2\n", ":2:", "key 'seed' is given twice"),
                              ("- a\n", "", "must be a mapping")):
        path = yaml_file(tmp_path, text)
        with pytest.raises(ConfigError) as info:
            read_yaml(path)
        assert f"{path}{where}" in str(info.value) and what in str(info.value), info.value
    assert not (tmp_path / "pwned").exists()


def test_fields_added_later_are_typed_without_code():
    @dataclass
    class Later:
        ratio: float = 0.5
        names: list[str] = field(default_factory=list)
        mode: typing.Literal["a", "b"] = "a"

    assert build_config(Later, None, ["--ratio", "1e-3", "--names", "x", "y", "--mode", "b"]) == Later(
        1e-3, ["x", "y"], "b")
    for argv in (["--ratio", "nan"], ["--mode", "c"], ["--ratio", "x"]):
        with pytest.raises(ConfigError):
            build_config(Later, None, argv)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"),
                                   PermissionError(errno.EACCES, "Permission denied", "/out"),
                                   ValueError("first line\n  second line")])
def test_the_cli_turns_expected_failures_into_one_line(error, monkeypatch, capsys, tmp_path):
    from tether import cli

    def fail(cfg):
        raise error

    table = dict(cli._commands())
    table["kl"] = (table["kl"][0], fail)
    monkeypatch.setattr(cli, "_commands", lambda: table)
    assert main(["kl", "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("tether kl: error: "), err
    expected = {OSError: "No space left on device: /out/model.safetensors", PermissionError: "Permission denied: /out",
                ValueError: "first line; second line"}[type(error)]
    assert err.endswith(expected), err


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 17024 vs 16916"), True),
    (RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"), True),
    (RuntimeError("shape mismatch in a matmul"), False),  # a bug keeps its traceback
])
def test_a_failed_write_on_a_full_disk_is_one_line(error, expected, monkeypatch, capsys, tmp_path):
    """torch.save reports a full disk as a RuntimeError, not an OSError (issue 15: "unexpected pos 17024 vs
    16916"); the CLI names it as a failed write, one line, exit 2. Other RuntimeErrors propagate."""
    from tether import cli

    def fail(cfg):
        raise error

    table = dict(cli._commands())
    table["kl"] = (table["kl"][0], fail)
    monkeypatch.setattr(cli, "_commands", lambda: table)
    if not expected:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            main(["kl", "--output", str(tmp_path / "r.json")])
        return
    assert main(["kl", "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("tether kl: error: writing failed — is the disk full?"), err
