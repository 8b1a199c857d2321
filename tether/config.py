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
from dataclasses import dataclass
from typing import Literal

__all__ = ["LoRAConfig", "ModelConfig", "OptimConfig", "RunConfig", "check_range"]


def check_range(name: str, value, ok: bool, command: str = "tether <command>") -> None:
    """Raise ``ValueError`` naming the field when ``ok`` is false."""
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range; see `{command} --help` for its meaning")


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
    """Continue from the newest checkpoint in output_dir (the same trajectory as an uninterrupted run)."""
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
