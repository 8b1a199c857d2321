"""`tether <command> [--config file.yaml] [--field value ...]`.

Each command is one typed config dataclass (fields documented in place) and one function. The YAML file, if
given, sets fields; flags on the command line override it; both go through one typed parser
(``tether.config.build_config``) and the dataclass validates the result; then input files, output locations and
data rows are checked (``preflight``), so a bad value fails before any work. Every expected failure (a bad value,
file, data row, a YAML or OS error) is one line on stderr naming the file or field, exit code 2.
`tether <command> --help` lists every field.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tether.config import build_config, check_paths

USAGE = """usage: tether <command> [--config FILE.yaml] [--field value ...]

commands:
  quickstart   sample, score, build pairs and train DPO on the embedded model; report reward and KL
  dpo          offline preference optimization (DPO, IPO, f-DPO, TDPO, SimPO, ORPO, KTO, ...)
  rl           online RL with group sampling (GRPO, DAPO, GPG, CPGD, RPG, GVPO, DisCO, APO, KDRL, ...)
  kl           measure KL(policy ‖ reference) on held-out prompts (token-level exact, sequence-level with CI)
  sample       best-of-N, soft best-of-N, tilted / rejection sampling, Q-probe: rewards, win rate, KL to the base
  distill      distill a teacher into a student (forward / reverse KL, JSD, skew KL, AKL …; off-/on-policy)
  frontier     reward vs KL(π ‖ π_ref) of best-of-N, tilting, DPO / RL runs and saved models, one evaluator, cached
  merge        merge model directories in weight space (soups, SLERP of task vectors, LITI) + KL to each input
  diagnose     where training moved the weights: per-matrix update norm, sparsity, spectral drift, off-principal share

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


def _run_merge(cfg):
    from tether.merge import run

    return run(cfg)


def _run_diagnose(cfg):
    from tether.diagnose import run

    return run(cfg)


def _commands():
    from tether.recipes.analysis_configs import (
        DiagnoseConfig,
        FrontierConfig,
        KLConfig,
        MergeConfig,
        SampleConfig,
    )
    from tether.recipes.configs import (
        DistillConfig,
        PreferenceConfig,
        QuickstartConfig,
        RLConfig,
    )
    from tether.recipes.online_rl import train as train_rl
    from tether.recipes.preference import train
    from tether.recipes.quickstart import run
    from tether.recipes.sample import run as sample

    return {"quickstart": (QuickstartConfig, run), "dpo": (PreferenceConfig, train), "rl": (RLConfig, train_rl),
            "kl": (KLConfig, _run_kl), "sample": (SampleConfig, sample),
            "distill": (DistillConfig, _run_distill), "frontier": (FrontierConfig, _run_frontier),
            "merge": (MergeConfig, _run_merge), "diagnose": (DiagnoseConfig, _run_diagnose)}


def load_config(cls, path: str | Path | None, overrides: list[str], prog: str):
    """YAML (optional) → flags over it → every value type- and range-checked → validated instance of ``cls``
    (``tether.config.build_config``: one typed path for YAML values and flags). ``--help`` prints the fields."""
    if any(a in ("-h", "--help") for a in overrides):
        import tyro

        tyro.cli(cls, args=["--help"], prog=prog, use_underscores=True)  # prints every field, exits 0
    return build_config(cls, path, overrides, command=prog)


def preflight(cfg, prog: str) -> None:
    """Checks that need no model, run before any work: input paths exist, outputs are writable
    (``tether.config.check_paths``), prompt files and preference files are valid row by row."""
    from tether.data import check_preference_file, load_prompt_rows
    from tether.models import EMBEDDED

    check_paths(cfg, model_names=frozenset({EMBEDDED, "embedded", "derived"}), command=prog)
    for name in ("prompts_file", "eval_prompts_file", "qprobe_train_file"):
        if getattr(cfg, name, None):
            load_prompt_rows(getattr(cfg, name))
    if getattr(cfg, "train_file", None):
        check_preference_file(cfg.train_file, on_error=getattr(cfg, "on_error", "raise"))


def one_line(err: BaseException) -> str:
    """An exception's message on one line (a multi-line data report is joined with '; ')."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


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
        except SystemExit as exit_:  # --help has been printed
            return exit_.code if isinstance(exit_.code, int) else 2
        preflight(cfg, f"tether {command}")
        fn(cfg)
    except (ValueError, OSError, ImportError) as err:  # expected failures: bad values, data, files, disk, imports
        print(f"tether {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if not _write_failure(err):
            raise  # a bug: keep the traceback
        print(f"tether {command}: error: writing failed — is the disk full? ({one_line(err)})", file=sys.stderr)
        return 2
    return 0


# What torch.save (its zip writer) and safetensors raise when a write fails part-way, e.g. on a full disk: a
# RuntimeError ("unexpected pos 17024 vs 16916", "PytorchStreamWriter failed writing file") or SafetensorError
# ("IoError(Os { code: 28, kind: StorageFull ... })"), not an OSError.
_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed", "No space left on device",
                   "StorageFull", "os error 28", "Disk quota exceeded")


def _write_failure(err: BaseException) -> bool:
    return (isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError") and any(
        s in str(err) for s in _WRITE_FAILURES)


if __name__ == "__main__":
    sys.exit(main())
