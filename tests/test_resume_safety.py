"""Output directory and resume safety (issue 15, item 4) on the preference recipe with a tiny model.

Kill tests run ``tether dpo`` in a subprocess that SIGKILLs itself at a chosen point (``TETHER_TEST_KILL_AT``, a
test hook in ``tether.checkpoints``): inside the atomic rewrite of ``metrics.jsonl``, in the middle of pruning an
old checkpoint, right before a finished checkpoint is renamed into place. The run is then resumed here and must
end exactly where an uninterrupted run ends (same metrics, bit-identical final weights). The subprocess runs one
thread, as this test process does (conftest), so both compute the same floats.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.checkpoints import latest_checkpoint, verify_checkpoint
from tether.cli import main
from tether.recipes.preference import PreferenceConfig, train
from tether.testing import make_tiny_model_dir
from tether.training import read_metrics, start_run

ROWS = [{"prompt": f"Question {i}: name a {w}.", "chosen": f"A fine {w}, number {i}.", "rejected": "no " * (1 + i % 3)
         + w} for i, w in enumerate(["cat", "dog", "tree", "river", "cloud", "stone", "bird", "lamp"])]
# 8 pairs, batch 2 → 4 optimizer steps; the values are the CLI flags too (subprocess runs).
RUN = dict(batch_size=2, grad_accum=1, lr=1e-3, warmup_ratio=0.25, schedule="cosine", max_length=128,
           max_prompt_length=64, tensorboard=False, progress=False)
KEYS = ("loss", "margin", "grad_norm", "lr", "accuracy", "chosen_logps")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    base = dict(train_file=str(pairs), model=str(make_tiny_model_dir(root / "m0", seed=0)), **RUN)
    full = train(PreferenceConfig(output_dir=str(root / "full"), **base))
    assert full.steps == 4
    return {"root": root, "base": base, "full": root / "full"}


def cfg(assets, out: Path, **extra) -> PreferenceConfig:
    return PreferenceConfig(output_dir=str(out), **{**assets["base"], **extra})


def assert_same_as_uninterrupted(assets, out: Path) -> None:
    full, got = read_metrics(assets["full"]), read_metrics(out)
    assert [m["step"] for m in got] == [1, 2, 3, 4], [m["step"] for m in got]
    for a, b in zip(full, got):
        for k in KEYS:
            assert a[k] == b[k], f"step {a['step']} {k}: {a[k]} (uninterrupted) vs {b[k]} (interrupted + resumed)"
    wa, wb = load_file(assets["full"] / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def run_cli_killed_at(assets, point: str, out: Path, **extra) -> subprocess.CompletedProcess:
    """``tether dpo`` in a subprocess that SIGKILLs itself at ``point``."""
    flags = []
    for k, v in {**assets["base"], **extra}.items():
        flags += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    env = {**os.environ, "TETHER_TEST_KILL_AT": point, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    script = "import sys, torch; torch.set_num_threads(1); from tether.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", script, "dpo", "--output_dir", str(out), *flags], env=env,
                          capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------------------------------- kill and resume


def test_kill_during_metrics_rewrite_loses_nothing(assets, tmp_path):
    """Run stopped after step 2; then (as if killed after logging step 3 but before its checkpoint) a step-3 line
    and a torn step-4 line are in metrics.jsonl. A resume must rewrite the file to steps 1–2; killed inside that
    rewrite (temporary file written and fsynced, not yet renamed), the file is untouched; the next resume drops the
    extra lines and ends as the uninterrupted run."""
    out = tmp_path / "run"
    train(cfg(assets, out, stop_after=2))
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n" + '{"step": 4, "lo')
    before = (out / "metrics.jsonl").read_bytes()
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]  # the torn last line is left out, not an error

    killed = run_cli_killed_at(assets, "rewrite:metrics.jsonl", out, resume=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "metrics.jsonl").read_bytes() == before, "a kill during the rewrite changed metrics.jsonl"
    assert list(out.glob(".metrics.jsonl.*.tmp")), "the kill should have left the rewrite's temporary file"

    train(cfg(assets, out, resume=True))
    assert not list(out.glob(".*.tmp")), "the temporary file of the killed rewrite was not cleaned"
    assert_same_as_uninterrupted(assets, out)


@pytest.mark.parametrize("point", ["prune", "checkpoint-rename:step-2"])
def test_kill_during_pruning_or_checkpoint_rename(assets, tmp_path, point):
    """Checkpoint every step, keep 2. ``prune``: killed after step-3 is in place and step-1 was renamed to
    ``.trash-*`` but not yet deleted — no half-deleted ``step-1`` is left, the leftover is cleaned at the next
    start. ``checkpoint-rename:step-2``: killed with step-2 complete in its temporary directory — it never counts as a
    checkpoint; the resume starts from step-1. Either way the resumed run equals the uninterrupted one."""
    out = tmp_path / "run"
    killed = run_cli_killed_at(assets, point, out, save_every=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    if point == "prune":
        assert [n for n in names if n.startswith("step-")] == ["step-2", "step-3"], names
        assert any(n.startswith(".trash-step-1-") for n in names), names
    else:
        assert [n for n in names if n.startswith("step-")] == ["step-1"], names
        assert any(n.startswith(".tmp-") for n in names), names
    train(cfg(assets, out, save_every=1, resume=True))
    assert_same_as_uninterrupted(assets, out)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_intact_one(assets, tmp_path, capsys):
    """Stopped after step 3 with checkpoints step-2 and step-3. One flipped byte in step-3's weights (same size:
    only the manifest's sha256 sees it) → resume skips step-3, says why, resumes from step-2 and ends as the
    uninterrupted run. A truncated file (size differs from the manifest) is skipped the same way."""
    out = tmp_path / "run"
    train(cfg(assets, out, save_every=1, stop_after=3))
    weights = out / "checkpoints" / "step-3" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "sha256" in verify_checkpoint(weights.parent)
    state = out / "checkpoints" / "step-2" / "trainer_state.pt"
    assert verify_checkpoint(state.parent) is None
    capsys.readouterr()
    train(cfg(assets, out, save_every=1, resume=True))
    said = capsys.readouterr().out
    assert "step-3 is damaged (model.safetensors does not match its sha256" in said and "at step 2/4" in said
    assert_same_as_uninterrupted(assets, out)

    os.truncate(out / "checkpoints" / "step-4" / "trainer_state.pt", 100)
    assert latest_checkpoint(out).name == "step-3"


# --------------------------------------------------------------------------------------- refusals, one line


def test_resume_without_a_checkpoint_is_an_error(assets, tmp_path):
    with pytest.raises(ValueError, match=r"resume: no checkpoint to resume from in .*there is none.*start fresh"):
        start_run(cfg(assets, tmp_path / "empty", resume=True))


def test_resume_with_changed_config_or_data_is_refused(assets, tmp_path, capsys):
    """lr and batch size shape the trajectory: refused, naming each change and what may change. The data file's
    contents changed under the same name: refused. The run's length and cadence may change: accepted."""
    out = tmp_path / "run"
    train(cfg(assets, out, stop_after=2))
    with pytest.raises(ValueError) as err:
        start_run(cfg(assets, out, resume=True, lr=2e-3, batch_size=4))
    msg = str(err.value)
    assert "\n" not in msg and "lr: 0.001 → 0.002" in msg and "batch_size: 2 → 4" in msg and "max_steps" in msg
    changed = tmp_path / "pairs.jsonl"
    changed.write_text(Path(assets["base"]["train_file"]).read_text().replace("cat", "cow"))
    data_out = tmp_path / "data"
    train(PreferenceConfig(output_dir=str(data_out), **{**assets["base"], "train_file": str(changed)}, stop_after=1))
    changed.write_text(Path(assets["base"]["train_file"]).read_text())
    with pytest.raises(ValueError, match="the contents of train_file"):
        start_run(PreferenceConfig(output_dir=str(data_out), **{**assets["base"], "train_file": str(changed)},
                                   resume=True))
    capsys.readouterr()
    start_run(cfg(assets, out, resume=True, max_steps=3, save_every=1))
    assert "resuming step-2 with changed max_steps: None → 3; save_every: 0 → 1" in capsys.readouterr().out


def test_a_second_run_in_the_same_directory_is_refused_and_a_dead_holders_lock_taken_over(assets, tmp_path,
                                                                                        capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(out / "tether.lock")!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{{os.getpid()}}\\n".encode())
        print("locked", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["dpo", "--train_file", assets["base"]["train_file"], "--model", assets["base"]["model"],
                     "--output_dir", str(out), "--progress", "false", "--tensorboard", "false"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"is in use by another tether run (pid {holder.pid} holds" in err
    finally:
        holder.kill()
        holder.wait()
    start_run(cfg(assets, out))  # the holder is dead: its lock is stale and taken over
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out


def test_fresh_run_refuses_to_delete_an_earlier_runs_checkpoints_without_overwrite(assets, tmp_path):
    out = tmp_path / "run"
    train(cfg(assets, out, stop_after=1))
    with pytest.raises(ValueError, match=r"holds the checkpoints of an earlier run \(step-1\).*overwrite: true"):
        start_run(cfg(assets, out))
    assert (out / "checkpoints" / "step-1").is_dir()
    assert (out / "tether_config.yaml").is_file() and not (out / "config.json").exists()


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_output_dir_must_not_be_an_input_model(assets, tmp_path, where):
    model = tmp_path / "model"
    make_tiny_model_dir(model, seed=0)
    out = {"same": model, "inside": model / "run", "holds": tmp_path}[where]
    if where == "holds":
        model = tmp_path / "final"
        make_tiny_model_dir(model, seed=0)
    with pytest.raises(ValueError, match=r"^output_dir: .*(is|lies inside|holds).*model"):
        start_run(cfg(assets, out, model=str(model)))
    assert not (Path(model) / "tether_config.yaml").exists() and not (Path(model) / "tether.lock").exists()


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous(assets, tmp_path, monkeypatch, capsys):
    """torch.save of step-4's trainer state raises ENOSPC (as a full disk does): the CLI prints one line naming the
    step, the cause and the intact previous checkpoint, exit 2; step-2 verifies (sizes and sha256), nothing of
    step-4 is left, no final model is written."""
    import tether.checkpoints as checkpoints

    real_save = checkpoints.torch.save

    def full_disk(obj, path, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    out = tmp_path / "run"
    flags = []
    for k, v in {**assets["base"], "save_every": 2}.items():
        flags += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    code = main(["dpo", "--output_dir", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "checkpoint step-4 could not be written" in err and "No space left on device" in err
    assert "step-2 is intact" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert verify_checkpoint(out / "checkpoints" / "step-2") is None and not (out / "final").exists()


def test_corrupt_reference_cache_is_recomputed(assets, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg(assets, out, max_steps=1))
    cache = out / "reference_logps.safetensors"
    good = cache.read_bytes()
    cache.write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    train(cfg(assets, out, max_steps=1, overwrite=True))
    assert "is unreadable" in capsys.readouterr().out and cache.read_bytes() == good


def test_damaged_teacher_cache_is_recomputed(assets, tmp_path, capsys):
    """distill's teacher-state cache (the same loader as its top-k store): a truncated file is recomputed and the
    run logs what a run with an intact cache logs."""
    from tether.recipes.configs import DistillConfig
    from tether.recipes.distill import train as distill

    base = dict(teacher_model=assets["base"]["model"], model=str(make_tiny_model_dir(tmp_path / "student", seed=1)),
                train_file=assets["base"]["train_file"], steps=1, batch_size=2, micro_batch_size=2,
                max_new_tokens=4, eval_prompts=0, tensorboard=False, progress=False)
    out = tmp_path / "run"
    first = distill(DistillConfig(output_dir=str(out), **base)).metrics[0]
    cache = out / "teacher_states.safetensors"
    cache.write_bytes(cache.read_bytes()[:100])
    capsys.readouterr()
    again = distill(DistillConfig(output_dir=str(out), overwrite=True, **base)).metrics[0]
    assert "teacher_states.safetensors is unreadable" in capsys.readouterr().out
    assert again["loss"] == first["loss"]
