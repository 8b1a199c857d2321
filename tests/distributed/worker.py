"""Run recipes in the processes torchrun starts: ``torchrun --standalone --nproc_per_node 2 worker.py SPEC.json``.

``SPEC.json`` is a list of ``{"recipe": "dpo" | "rl" | "distill", "config": {...}}``; each run is trained in turn in
the same processes (one process group). RL runs use a Python reward (the share of vowels in the completion), which
the command line cannot name. With ``"bypass": true`` (DPO only) the loss is computed by calling the policy
directly, outside the DDP wrapper's forward — the unsynchronized path the tests must catch. With
``"kill": {"rank": r, "step": k}`` (DPO only) rank r kills itself (SIGKILL) right after checkpoint step-k is written.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch


def vowel_share(prompt: str, completion: str, row: dict) -> float:
    return sum(ch in "aeiouAEIOU" for ch in completion) / max(len(completion), 1)


def run(spec: dict) -> None:
    recipe, values = spec["recipe"], spec["config"]
    if recipe == "dpo":
        from tether.recipes import preference
        from tether.recipes.configs import PreferenceConfig

        call = preference.Trainable.__call__
        if spec.get("bypass"):
            preference.Trainable.__call__ = lambda self, fn, *a, **k: fn(self.policy, *a, **k)
        if kill := spec.get("kill"):
            save = preference.save_checkpoint

            def save_then_die(out_dir, step, **kwargs):
                path = save(out_dir, step, **kwargs)
                if step == kill["step"] and int(os.environ["RANK"]) == kill["rank"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                return path

            preference.save_checkpoint = save_then_die
        try:
            preference.train(PreferenceConfig(**values))
        finally:
            preference.Trainable.__call__ = call
    elif recipe == "rl":
        from tether.recipes.configs import RLConfig
        from tether.recipes.online_rl import train

        train(RLConfig(**values), reward=vowel_share)
    elif recipe == "distill":
        from tether.recipes.configs import DistillConfig
        from tether.recipes.distill import train

        train(DistillConfig(**values))
    else:
        raise ValueError(f"unknown recipe {recipe!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for spec in json.loads(open(sys.argv[1]).read()):
        run(spec)
