"""The README's two set-up commands are real: the test command is what CI runs, and the main job runs (at tiny
scale, through the installed `tether` entry point)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.startswith("pip install torch==2.13.0 && ")
    assert tests.startswith("pip install torch==2.13.0 && ")
    assert main_job.split("&&")[-1].strip().startswith("tether quickstart")
    assert tests.split("&&")[-1].strip() == "python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, ".ci/run must call the README's test command verbatim"


def test_readme_main_job_runs_at_tiny_scale(tmp_path):
    from tether.testing import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    job = _setup_commands()[0].split("&&")[-1].strip()
    argv = shlex.split(job)
    assert argv[:2] == ["tether", "quickstart"]
    out = tmp_path / "qs"
    tiny = ["--model", str(model_dir), "--output_dir", str(out), "--train_prompts", "8", "--heldout_prompts", "2",
            "--samples_per_prompt", "8", "--max_new_tokens", "16", "--kl_samples_per_prompt", "1", "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: one thread is much faster on shared cores
    proc = subprocess.run([sys.executable, "-m", "tether", *argv[1:], *tiny], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "quickstart_report.json").read_text())
    assert report["pairs"] >= 1
    assert (out / "quickstart.png").stat().st_size > 1000
    assert "held-out rule reward" in proc.stdout


def test_readme_frontier_command_runs_at_tiny_scale(tmp_path):
    """The command of the README's frontier section, through the installed entry point, every point tiny."""
    from tether.testing import make_tiny_model_dir

    text = (ROOT / "README.md").read_text()
    section = text.split("## The reward–KL frontier", 1)[1].split("\n## ", 1)[0]
    (command,) = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                  for line in block.splitlines() if line.strip()]
    argv = shlex.split(command)
    assert argv[:2] == ["tether", "frontier"]
    out = tmp_path / "frontier"
    tiny = ["--model", str(make_tiny_model_dir(tmp_path / "tiny")), "--output_dir", str(out), "--max_prompts", "2",
            "--max_new_tokens", "4", "--samples_per_prompt", "2", "--base_samples", "1", "--no_progress",
            "--dpo_overrides", "max_steps", "1", "batch_size", "2",
            "--rl_overrides", "steps", "1", "prompts_per_step", "2", "group_size", "2", "max_new_tokens", "4",
            "train_prompts", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tether", *argv[1:], *tiny], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "frontier.json").read_text())
    assert report["computed"] == len(report["points"]) > 0
    assert (out / "frontier.png").stat().st_size > 1000


def test_readme_merge_and_diagnose_commands_run_at_tiny_scale(tmp_path):
    """The two commands of the README's merging section, through the installed entry point, on tiny models: the
    README's flags as written, then the model directories and outputs replaced (a flag given twice takes its last
    value)."""
    from tether.testing import make_tiny_model_dir

    text = (ROOT / "README.md").read_text()
    section = text.split("## Reference strategies, merging and update diagnostics", 1)[1].split("\n## ", 1)[0]
    merge, diagnose = [shlex.split(line.strip()) for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                       for line in block.splitlines() if line.strip()]
    assert merge[:2] == ["tether", "merge"] and diagnose[:2] == ["tether", "diagnose"]
    a, b, c = (str(make_tiny_model_dir(tmp_path / f"m{s}", seed=s)) for s in range(3))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tiny = {"merge": ["--models", b, c, "--base", a, "--output_dir", str(tmp_path / "merged"),
                      "--kl_samples_per_prompt", "1", "--kl_max_new_tokens", "4"],
            "diagnose": ["--base", a, "--trained", str(tmp_path / "merged"), "--output_dir", str(tmp_path / "diag"),
                         "--subspace_rank", "4"]}
    for argv in (merge, diagnose):
        proc = subprocess.run([sys.executable, "-m", "tether", *argv[1:], *tiny[argv[1]]], capture_output=True,
                              text=True, timeout=600, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert set(report["kl_to"]) == {b, c, "base:" + a} and report["eta"] == 0.3
    assert json.loads((tmp_path / "diag" / "diagnose.json").read_text())["matrices"]
    assert (tmp_path / "diag" / "diagnose.png").stat().st_size > 1000


def test_readme_multiprocess_commands_run_at_tiny_scale(tmp_path):
    """The torchrun commands of the README's multi-process section, 2 gloo processes on the CPU, each with its
    config's tiny overrides (``tests/test_cli_configs.py``). The Accelerate commands need GPUs: their config files
    must load with Accelerate and launch the same tether command as a torchrun line. ``--standalone`` is replaced by
    a rendezvous at 127.0.0.1 (``tether.distributed.local_launch_args``): this machine's host name does not resolve."""
    from accelerate.commands.config.config_args import load_config_from_file
    from test_cli_configs import as_flags, tiny_overrides

    from tether.distributed import local_launch_args
    from tether.testing import make_tiny_model_dir

    text = (ROOT / "README.md").read_text()
    section = text.split("## Multi-process training: torchrun, DDP and FSDP2", 1)[1].split("\n## ", 1)[0]
    lines = [shlex.split(line.strip()) for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
             for line in block.splitlines() if line.strip()]
    runs = [argv for argv in lines if argv[0] == "torchrun"]
    launches = [argv for argv in lines if argv[0] == "accelerate"]
    assert len(runs) == 2 and len(launches) == 2
    model = str(make_tiny_model_dir(tmp_path / "tiny"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k, argv in enumerate(runs):
        command = argv[argv.index("tether") + 1]
        tiny = as_flags(tiny_overrides(command, model, tmp_path / f"run{k}"))
        assert argv[1:4] == ["--standalone", "--nproc_per_node", "2"], argv
        launch = [sys.executable, "-m", "torch.distributed.run", *local_launch_args(2), *argv[4:], *tiny]
        proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert (tmp_path / f"run{k}" / "final" / "model.safetensors").is_file()
    for argv in launches:
        config = load_config_from_file(str(ROOT / argv[argv.index("--config_file") + 1]))
        assert config.num_processes > 1 and not config.use_cpu
        assert any(argv[argv.index("tether"):] == run[run.index("tether"):] for run in runs), argv
