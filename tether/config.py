"""Config parts every training recipe shares: the run (output, seed, checkpoints, logging), the models, the optimizer
and LoRA.

A recipe's config is one flat dataclass that inherits these parts and adds its own fields::

    @dataclass
    class RLConfig(RunConfig, ModelConfig, OptimConfig, LoRAConfig):
        steps: int = 20
        \"\"\"RL steps.\"\"\"
        lr: float = 1e-6        # a recipe's own default for a shared field: one line, the docs stay with the part

Flat, because a YAML config and the command line name fields directly (``lr: 1.0e-5``, ``--lr 1e-5``), as users
write them. Each part validates its own fields in ``__post_init__`` (the parts chain through ``super()``), so a bad
value fails at construction with a message naming the field, whichever recipe it belongs to.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["RANGES", "ConfigError", "LoRAConfig", "ModelConfig", "OptimConfig", "RunConfig", "build_config",
           "check_output_dir", "check_paths", "check_range", "check_value", "parse_flags", "read_yaml"]


def check_range(name: str, value, ok: bool, command: str = "tether <command>", allowed: str | None = None) -> None:
    """Raise ``ValueError`` naming the field and what is allowed (``allowed``, else :data:`RELATIONS` or
    :data:`RANGES` by name) when ``ok`` is false."""
    if not ok:
        allowed = allowed or RELATIONS.get(name) or (RANGES[name][1] if name in RANGES else None)
        raise ValueError(f"{name}={value!r} is out of range" + (f": allowed {allowed}" if allowed else "")
                         + f"; see `{command} --help` for its meaning")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class _Part:
    def __post_init__(self) -> None:  # end of the parts' super() chain
        pass


@dataclass
class RunConfig(_Part):
    output_dir: str = "runs/run"
    """Where checkpoints, metrics.jsonl, TensorBoard logs, the final model and the run's reports go."""
    seed: int = 0
    """Seeds data order, sampling and everything random."""
    device: str = "cpu"
    """Where the models and batches live ('cpu' or 'cuda')."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    resume: bool = False
    """Continue from the newest intact checkpoint in output_dir (the same trajectory as an uninterrupted run); an
    error when there is none, or when a field other than the run's length, cadence and reporting changed."""
    overwrite: bool = False
    """Allow a fresh run (resume false) to delete the checkpoints an earlier run left in output_dir."""
    stop_after: int | None = None
    """Stop (as if interrupted) after this step, after checkpointing; continue with resume."""
    tensorboard: bool = True
    """Also log metrics to TensorBoard (output_dir/tensorboard)."""
    progress: bool = True
    """Show progress bars."""
    distributed: Literal["none", "ddp", "fsdp2"] = "none"
    """Multi-process training under torchrun (``tether.distributed``): 'ddp' or 'fsdp2'; batch sizes and gradient
    accumulation keep their meaning (the global step) at any number of processes."""

    def __post_init__(self) -> None:
        check_range("distributed", self.distributed, self.distributed in ("none", "ddp", "fsdp2"))
        check_range("save_every", self.save_every, self.save_every >= 0)
        check_range("stop_after", self.stop_after, self.stop_after is None or self.stop_after >= 1)
        super().__post_init__()


@dataclass
class ModelConfig(_Part):
    model: str = "smollm2-135m-instruct"
    """Policy to train: 'smollm2-135m-instruct' (embedded) or a local Hugging Face model directory."""
    ref_model: str | None = None
    """Reference model (a local directory); None = the starting policy (a frozen copy, or LoRA's base)."""
    chunk_size: int = 512
    """Response tokens per chunk of the LM head (memory ∝ chunk_size × vocab)."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's activations in the backward pass (less memory, one more forward pass)."""

    def __post_init__(self) -> None:
        check_range("chunk_size", self.chunk_size, self.chunk_size >= 1)
        super().__post_init__()


@dataclass
class OptimConfig(_Part):
    lr: float = 5e-6
    """Peak learning rate."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer steps of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases/norms)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold (0 disables clipping)."""

    def __post_init__(self) -> None:
        check_range("lr", self.lr, _finite(self.lr) and self.lr > 0)
        check_range("warmup_ratio", self.warmup_ratio, _finite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1)
        check_range("weight_decay", self.weight_decay, _finite(self.weight_decay) and self.weight_decay >= 0)
        check_range("max_grad_norm", self.max_grad_norm, _finite(self.max_grad_norm) and self.max_grad_norm >= 0)
        super().__post_init__()


@dataclass
class LoRAConfig(_Part):
    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights; the reference is then the base with adapters off."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling α."""

    def __post_init__(self) -> None:
        check_range("lora_r", self.lora_r, self.lora_r >= 1)
        super().__post_init__()


# ------------------------------------------------------------------------------------------------------------
# One typed layer for YAML values and command-line flags.
# ------------------------------------------------------------------------------------------------------------
#
# ``build_config(cls, yaml_path, flags)`` reads the YAML file (``read_yaml``), parses the flags (``parse_flags``),
# checks every value against the field's type hint (``check_value``: the same code for both sources), checks the
# ranges of ``RANGES`` by field name, and only then constructs ``cls`` (whose ``__post_init__`` checks what depends
# on several fields). Nothing here names a recipe's field except ``RANGES``, so a field added later is parsed and
# type-checked without code; give it a row in ``RANGES`` when it has a range.


class ConfigError(ValueError):
    """A config value, flag or file is wrong; the message is one line naming the file or field and the fix."""


def _at_least(lo):
    return (lambda v: v >= lo), f">= {lo}"


def _positive():
    return (lambda v: v > 0), "> 0"


def _unit(lo_open: bool, hi_open: bool):
    def ok(v):
        return (0 < v if lo_open else 0 <= v) and (v < 1 if hi_open else v <= 1)
    return ok, f"{'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"


#: Allowed range of a field, by name, in every config that has the field (for a list, of each element).
#: A field a recipe uses differently keeps its own, stricter check in the recipe's ``__post_init__``.
RANGES: dict[str, tuple] = {
    **{name: _at_least(1) for name in (
        "steps", "max_steps", "epochs", "batch_size", "micro_batch_size", "grad_accum", "prompts_per_step",
        "group_size", "max_new_tokens", "kl_max_new_tokens", "ppo_epochs", "mini_batches", "chunk_size", "lora_r",
        "lora_alpha", "sample_batch_size", "samples_per_prompt", "kl_samples_per_prompt", "eval_samples_per_prompt",
        "train_prompts", "heldout_prompts", "student_stride", "max_length", "max_prompt_length", "adpa_top_k",
        "astar_value_samples", "ref_every", "stop_after", "n", "best_of_n", "tilted_n", "rl_steps",
        "max_prompts")},
    **{name: _at_least(0) for name in (
        "save_every", "eval_every", "eval_prompts", "top_k", "overlong_buffer",
        "max_refill_rounds", "base_samples", "weight_decay", "max_grad_norm", "nll_weight", "care_bonus", "kl_coef",
        "qprobe_l2", "ensemble_lambda", "tau", "dckd_chosen_weight", "dckd_rejected_weight", "dckd_teacher_top_k")},
    **{name: _positive() for name in (
        "lr", "temperature", "beta", "target_kl", "kl_horizon", "ctrl_t", "dpkd_beta", "divergence_temperature",
        "astar_value_beta", "tilted_beta", "dpo_beta", "rl_beta")},
    "warmup_ratio": _unit(False, True), "top_p": _unit(True, False), "lmbda": _unit(False, False),
    "difficulty_low": _unit(False, False), "difficulty_high": _unit(False, False),
    "ref_rate": _unit(False, False), "risk_confidence": _unit(True, True), "teacher_mixed_alpha": _unit(False, True),
}


#: What a recipe's own check of a field allows where it depends on another field or on the recipe (the message of
#: ``check_range`` for these names; ``RANGES`` has already passed when they are checked).
RELATIONS: dict[str, str] = {
    "group_size": ">= 2 for a grouped objective (>= 1 for one without groups)",
    "mini_batches": "1 <= mini_batches <= prompts_per_step, dividing it",
    "overlong_buffer": "0 <= overlong_buffer < max_new_tokens",
    "max_prompt_length": "1 <= max_prompt_length < max_length",
    "samples_per_prompt": ">= 2 where pairs are built from the samples (quickstart)",
    "difficulty_low": "0 <= difficulty_low <= difficulty_high",
}


def _yaml_loader():
    """``yaml.SafeLoader`` plus: numbers written ``1e-5`` are floats (YAML 1.1 needs ``1.0e-5``, users write
    ``1e-5``), and a key given twice is an error (plain YAML keeps the last one silently)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def read_yaml(path: str | Path) -> dict:
    """The mapping of a YAML config file; a missing file, a YAML error or a non-mapping is a one-line
    :class:`ConfigError` naming the file (and the line)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists() else
                          f"config file {path} is not a file")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x) \
            or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML error: {what}; fix the file's syntax (tags like !!python/... are not "
                          "allowed)") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of field: value, not a "
                          f"{type(values).__name__}")
    return values


def _describe_type(tp) -> str:
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple):
        return f"a list of {_describe_type(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_describe_type(args[0])}: {_describe_type(args[1])}" if args else "a mapping"
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    pass


def _typed(tp, value):
    """``value`` as type ``tp`` (ints widened to float for float), or raise ``_Mismatch``. Strings never become
    numbers or booleans here: that happens only where flags are read (``parse_flags``)."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _typed(arg, value)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is typing.Literal:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and value in args:
            return value
        if isinstance(value, bool) and value in args and any(isinstance(a, bool) for a in args):
            return value
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        inner = args[0] if args else typing.Any
        out = [_typed(inner, v) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        key_t, val_t = args if args else (typing.Any, typing.Any)
        return {_typed(key_t, k): _typed(val_t, v) for k, v in value.items()}
    return value  # a type this layer does not know (e.g. a nested dataclass): the dataclass checks it


def _non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def check_value(name: str, tp, value, *, source: str = "", command: str = "tether <command>"):
    """``value`` checked against the type hint ``tp`` and the range of ``name`` in :data:`RANGES`; returned typed
    (ints widened to float where a float is expected). Raise a one-line :class:`ConfigError` naming ``source``
    (a file, or "flag --name") and the field, with what is allowed."""
    where = f"{source}: " if source else ""
    try:
        typed = _typed(tp, value)
    except _Mismatch:
        hint = ""
        if isinstance(value, str) and "list" in _describe_type(tp) and not isinstance(value, list):
            hint = f" (write a list: [{value!r}])"
        raise ConfigError(f"{where}{name}: {value!r} is not {_describe_type(tp)}{hint}") from None
    if _non_finite(typed):
        raise ConfigError(f"{where}{name}: {value!r} is not finite; give a finite number"
                          + (f" ({RANGES[name][1]})" if name in RANGES else ""))
    if name in RANGES:
        ok, allowed = RANGES[name]
        items = typed if isinstance(typed, (list, tuple)) else [typed]
        bad = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool) and not ok(v)]
        if bad or (isinstance(typed, (list, tuple)) and not typed):
            raise ConfigError(f"{where}{name}={value!r} is out of range: allowed {allowed}"
                              f"{' for each element (and at least one)' if isinstance(typed, (list, tuple)) else ''}"
                              f"; see `{command} --help`")
    return typed


def _scalar(token: str):
    """A flag's text read as a YAML scalar or flow collection (``1e-5`` → float, ``[a, b]`` → list, ``None`` →
    None); text that YAML cannot read stays the string itself."""
    import yaml

    if token in ("None", "none"):
        return None
    try:
        value = yaml.load(token, Loader=_yaml_loader())
    except yaml.YAMLError:
        return token
    if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return float(value)  # Python's spelling of the non-finite floats: read, then refused as not finite
    return value


def _flag_value(tp, tokens: list[str]):
    """The value of a flag given ``tokens`` (one or more words after it), for a field of type hint ``tp``: each
    word is read as YAML (``_scalar``) and kept as text where the field takes a string and the YAML reading does
    not fit; several words make a list, or a mapping from ``key value`` pairs."""
    import types
    import typing

    def one(t, token):
        value = _scalar(token)
        try:
            return _typed(t, value)
        except _Mismatch:
            return token if _accepts_str(t) else value

    origin = typing.get_origin(tp)
    members = typing.get_args(tp) if origin in (typing.Union, types.UnionType) else (tp,)
    container = next((m for m in members if typing.get_origin(m) in (list, tuple, dict)), None)
    if container is None or (len(tokens) == 1 and isinstance(_scalar(tokens[0]), (list, dict))):
        return one(tp, tokens[0]) if len(tokens) == 1 else tokens
    args = typing.get_args(container)
    if typing.get_origin(container) is dict:
        if len(tokens) % 2:
            return tokens  # refused by the type check, with the flag named
        val_t = args[1] if args else typing.Any
        return {k: one(val_t, v) for k, v in zip(tokens[::2], tokens[1::2])}
    inner = args[0] if args else typing.Any
    return [one(inner, t) for t in tokens]


def _accepts_str(tp) -> bool:
    import types
    import typing

    if tp is str or tp is typing.Any:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return False


def parse_flags(cls, args: list[str], *, command: str = "tether <command>") -> dict:
    """``--field value [value ...]``, ``--field=value``, ``--flag`` / ``--no_flag`` (booleans; ``-`` may replace
    ``_``) → {field: value}, typed by the field's type hint (``_flag_value``); a flag given twice takes its last
    value (as argparse does); an unknown flag, a missing value or a stray word is a one-line :class:`ConfigError`."""
    import difflib
    import typing
    from dataclasses import fields

    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: give fields as --field value")
        name, eq, inline = arg[2:].partition("=")
        name = name.replace("-", "_")
        negated = name.startswith("no_") and name not in known and name[3:] in known
        field = name[3:] if negated else name
        if field not in known:
            close = difflib.get_close_matches(field, sorted(known), n=3)
            raise ConfigError(f"unknown flag --{name}" + (f" (did you mean {', '.join('--' + c for c in close)}?)"
                                                          if close else f"; see `{command} --help`"))
        tokens = [inline] if eq else []
        i += 1
        while not eq and i < len(args) and not (args[i].startswith("--") and len(args[i]) > 2):
            tokens.append(args[i])
            i += 1
        tp = hints[field]
        if negated or (tp is bool and not tokens):
            if tp is not bool or tokens:
                raise ConfigError(f"flag --{name}: --no_<field> is for true/false fields without a value")
            out[field] = not negated
            continue
        if not tokens:
            raise ConfigError(f"flag --{name} needs a value ({_describe_type(tp)})")
        out[field] = _flag_value(tp, tokens)
    return out


def build_config(cls, yaml_path: str | Path | None = None, flags: list[str] = (), *,
                 command: str = "tether <command>"):
    """YAML file (optional) → flags over it → every value type- and range-checked (``check_value``) → ``cls(...)``.

    One path for both sources: a YAML value and the same value given as a flag are parsed to the same type and
    refused with the same message. Unknown fields, wrong types (``"false"`` for a bool, ``2.5`` for a count,
    ``"###"`` for a list), non-finite floats and values out of :data:`RANGES` are one-line :class:`ConfigError`s
    naming the file or flag and the field; then ``cls.__post_init__`` checks what depends on several fields."""
    import typing
    from dataclasses import fields

    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    values: dict = {}
    if yaml_path is not None:
        raw = read_yaml(yaml_path)
        unknown = sorted(map(str, set(raw) - known))
        if unknown:
            raise ConfigError(f"{yaml_path}: unknown field(s) {unknown} for `{command}`; see `{command} --help`")
        values = {k: check_value(k, hints[k], v, source=str(yaml_path), command=command) for k, v in raw.items()}
    for k, v in parse_flags(cls, list(flags), command=command).items():
        values[k] = check_value(k, hints[k], v, source="command line", command=command)
    try:
        return cls(**values)
    except TypeError as err:  # e.g. a required field left out
        raise ConfigError(f"{command}: {err}") from None


#: Fields holding a model: a name the loader knows (passed to ``check_paths``) or a local directory.
MODEL_FIELDS = frozenset({"model", "ref_model", "teacher_model", "policy", "reference", "reward_model",
                          "reward_models", "models", "ref_soup", "base", "trained"})
#: Fields holding an input file besides those named ``*_file`` or ``*_config``.
INPUT_FIELDS = frozenset({"qprobe"})


def _output_problem(path: Path, *, is_dir: bool) -> str | None:
    if path.exists():
        if is_dir and not path.is_dir():
            return f"{path} exists and is a file, not a directory"
        if not is_dir and path.is_dir():
            return f"{path} is a directory; give a file path"
        target = path if is_dir else path.parent
        return None if os.access(target, os.W_OK | os.X_OK) else f"{target} is not writable"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so {path} cannot be created under it"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable, so {path} cannot be created"
    return None


#: What a training run writes or deletes under its output_dir: an input model there would be overwritten.
RUN_OUTPUTS = ("final", "checkpoints")


def check_output_dir(cfg) -> None:
    """Refuse an ``output_dir`` that is an input model's directory or lies inside one (checkpoints, logs and
    tether's files would land among the model's files), or that holds an input model where a run writes or
    deletes (:data:`RUN_OUTPUTS`); a one-line :class:`ConfigError` naming both fields."""
    from dataclasses import fields

    out = getattr(cfg, "output_dir", None)
    if not isinstance(out, str) or not out:
        return
    out_path = Path(out).resolve()
    for f in fields(cfg):
        if f.name not in MODEL_FIELDS:
            continue
        value = getattr(cfg, f.name)
        for p in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
            if not isinstance(p, str) or not p or not Path(p).is_dir():
                continue
            model = Path(p).resolve()
            if model == out_path or model in out_path.parents:
                where = "is" if model == out_path else "lies inside"
                raise ConfigError(f"output_dir: {out} {where} the input model directory {p} ({f.name}); the run "
                                  "would write its files there — choose another output_dir")
            if out_path in model.parents and model.relative_to(out_path).parts[0] in RUN_OUTPUTS:
                raise ConfigError(f"output_dir: {out} holds the input model {p} ({f.name}) where a run writes and "
                                  "deletes; copy the model elsewhere or choose another output_dir")


def check_paths(cfg, *, model_names: frozenset[str] = frozenset(), command: str = "tether <command>") -> None:
    """Before any work: every input path exists and every output location can be written, by field name —
    fields ending in ``_file`` or ``_config`` (and :data:`INPUT_FIELDS`) name existing files or dataset
    directories, :data:`MODEL_FIELDS` a name in ``model_names`` or an existing directory, ``output`` /
    ``output_dir`` / ``output_*_dir|_file|_path`` a writable place. A problem is a one-line
    :class:`ConfigError` naming the field."""
    from dataclasses import fields

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        paths = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
        paths = [p for p in paths if isinstance(p, str) and p]
        for p in paths:
            path = Path(p)
            if f.name.endswith(("_file", "_config")) or f.name in INPUT_FIELDS:
                if not path.exists():
                    raise ConfigError(f"{f.name}: {p} does not exist (cwd is {Path.cwd()}); check the path")
            elif f.name in MODEL_FIELDS:
                if p not in model_names and not path.is_dir():
                    raise ConfigError(f"{f.name}: {p} is not a local model directory"
                                      + (f" (nor one of {sorted(model_names)})" if model_names else "")
                                      + " — models load from disk only")
            elif f.name in ("output", "output_dir") or (f.name.startswith("output_")
                                                        and f.name.endswith(("_dir", "_file", "_path"))):
                if problem := _output_problem(path, is_dir=f.name.endswith("_dir")):
                    raise ConfigError(f"{f.name}: {problem}; choose another {f.name}")
    check_output_dir(cfg)
