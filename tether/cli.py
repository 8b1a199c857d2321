"""`tether <command> [--config file.yaml] [--field value ...]`.

Each command is one typed config dataclass (fields documented in place) and one function. The YAML file, if
given, sets fields; flags on the command line override it; the dataclass validates the result, so a bad value
fails before any work with a message that names the field. `tether <command> --help` lists every field.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

USAGE = """usage: tether <command> [--config FILE.yaml] [--field value ...]

commands:
  quickstart   sample, score, build pairs and train DPO on the embedded model; report reward and KL
  dpo          offline preference optimization (DPO, IPO, f-DPO, TDPO, SimPO, ORPO, KTO, ...)
  rl           online RL with group sampling (GRPO, DAPO, GPG, CPGD, RPG, GVPO, DisCO, APO, KDRL, ...)
  kl           measure KL(policy ‖ reference) on held-out prompts (token-level exact, sequence-level with CI)
  sample       best-of-N, soft best-of-N, tilted / rejection sampling, Q-probe: rewards, win rate, KL to the base
  distill      distill a teacher into a student (forward / reverse KL, JSD, skew KL, AKL …; off-/on-policy)
  frontier     reward vs KL(π ‖ π_ref) of best-of-N, tilting, DPO / RL runs and saved models, one evaluator, cached

`tether <command> --help` shows every field of that command's config."""


def _run_kl(cfg):
    from tether.eval.kl import measure_kl_from_files

    if not cfg.policy or not cfg.prompts_file:
        raise ValueError("tether kl needs --policy DIR and --prompts_file FILE")
    return measure_kl_from_files(policy=cfg.policy, reference=cfg.reference, prompts_file=cfg.prompts_file,
                                 samples_per_prompt=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                 seed=cfg.seed, output=cfg.output, progress=True, device=cfg.device)


def _run_distill(cfg):
    from tether.recipes.distill import train

    return train(cfg)


def _run_frontier(cfg):
    from tether.recipes.frontier import run

    return run(cfg)


def _commands():
    from tether.recipes.configs import (
        DistillConfig,
        FrontierConfig,
        KLConfig,
        PreferenceConfig,
        QuickstartConfig,
        RLConfig,
        SampleConfig,
    )
    from tether.recipes.online_rl import train as train_rl
    from tether.recipes.preference import train
    from tether.recipes.quickstart import run
    from tether.recipes.sample import run as sample

    return {"quickstart": (QuickstartConfig, run), "dpo": (PreferenceConfig, train), "rl": (RLConfig, train_rl),
            "kl": (KLConfig, _run_kl), "sample": (SampleConfig, sample),
            "distill": (DistillConfig, _run_distill), "frontier": (FrontierConfig, _run_frontier)}


def load_config(cls, path: str | Path | None, overrides: list[str], prog: str):
    """YAML (optional) → defaults → CLI overrides → validated instance of ``cls``."""
    import tyro
    import yaml

    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config file must be a mapping of field: value")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown} for `{prog}`; known fields: {sorted(known)}")
    default = cls(**values)
    return tyro.cli(cls, default=default, args=overrides, prog=prog, use_underscores=True)


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    config, rest, i = None, [], 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            config, i = args[i + 1], i + 2
        elif args[i].startswith("--config="):
            config, i = args[i].split("=", 1)[1], i + 1
        else:
            rest.append(args[i])
            i += 1
    return config, rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    commands = _commands()
    command, rest = argv[0], argv[1:]
    if command not in commands:
        print(f"tether: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tether shows its own progress; HF's per-file bars are noise here
    cls, fn = commands[command]
    config_path, overrides = _split_config(rest)
    try:
        try:
            cfg = load_config(cls, config_path, overrides, prog=f"tether {command}")
        except SystemExit as exit_:  # tyro has printed the problem (or --help) to the terminal; return its code
            return exit_.code if isinstance(exit_.code, int) else 2
        fn(cfg)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"tether {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
