"""Multi-process training on torch.distributed (launched by ``torchrun``): DDP or FSDP2, chosen by a config field.

    torchrun --standalone --nproc_per_node 2 -m tether dpo --config configs/dpo_smollm2.yaml --distributed ddp

tether does not run an engine of its own: DDP (``torch.nn.parallel.DistributedDataParallel``) and FSDP2
(``torch.distributed.fsdp.fully_shard``) move the gradients; this module holds the few decisions a recipe needs on
top of them, so that a run on W processes computes what one process computes:

* :func:`init` — the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): gloo on
  CPU, NCCL on CUDA (each rank on GPU ``LOCAL_RANK``). :func:`current` is the run's :class:`Dist` afterwards.
* :class:`Trainable` — the policy wrapped for training. **The loss is computed inside the wrapper's forward**:
  ``trainable(fn, *args)`` calls ``fn(policy, *args)`` from the forward of a thin :class:`LossModule` that DDP /
  ``fully_shard`` wrap. Why it matters (measured here, 2 gloo processes, torch 2.13): tether's chunked log-prob path
  calls the backbone and the LM head directly (``tether.logprobs``), never ``model(...)``. DDP only arms its gradient
  all-reduce in its own forward, so a direct call silently trains each rank on its own gradient (the ranks' gradients
  differed by 0.42); FSDP2 gathers the parameters in the root's forward, so a direct call fails ("mixed
  torch.Tensor and DTensor"). Through ``LossModule.forward`` both match one process (1.5e-8).
  No-grad passes outside the loss (sampling, scoring, evaluation) run on the model :meth:`Trainable.gathered`
  yields: the policy itself, or under FSDP2 a plain copy holding the gathered full weights (every rank enters it
  together; inside, ranks may run different numbers of forward calls).
* In-place gradient writes are off under a wrapper: ``tether.logprobs``'s embedding-gradient shortcut adds into
  ``.grad`` behind autograd's back, which DDP's reducer and FSDP2's reduce-scatter never see (the ranks agreed but
  were 0.14 off); it checks :func:`wrapped_training` and takes the ordinary autograd path.
* **Sharding that keeps the global batch**: a config's batch sizes and gradient accumulation describe the global
  optimizer step, at any world size. Each micro-batch of the single-process schedule is dealt to the ranks
  (:func:`shard_rows`: rank r takes rows r, r+W, …), so every rank runs the same number of forward/backward passes
  (DDP and FSDP2 need that) and together they see exactly one process's rows. DDP and FSDP2 *average* gradients
  over ranks; each rank's loss is its rows' share of the global loss times W (:attr:`Dist.world`), so the average is
  the global loss's gradient. A rank left without rows (a micro-batch smaller than W) runs a stand-in row with weight
  0. The learning-rate schedule counts optimizer steps, which are the same at any world size.
* Metrics and the exact KL are sums over ranks (:func:`all_sum`, :func:`all_sum_`); rank 0 alone writes
  (:attr:`Dist.main`; ``tether.training`` and ``tether.checkpoints`` check it).

Gradient sync per micro-batch is skipped until the step's last one (:meth:`Trainable.sync`: DDP's ``no_sync``,
FSDP2's ``set_requires_gradient_sync``); the accumulated gradient is the same either way.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

__all__ = ["MODES", "Dist", "init", "current", "shutdown", "local_launch_args", "LossModule", "Trainable",
           "shard_rows", "all_sum", "all_sum_", "gather_objects", "broadcast_object", "barrier", "wrapped_training",
           "is_sharded"]

MODES = ("none", "ddp", "fsdp2")


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run."""

    mode: str = "none"
    """'none' (one process), 'ddp' or 'fsdp2'."""
    rank: int = 0
    world: int = 1
    """Number of processes (W)."""
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def main(self) -> bool:
        """True on the process that writes (rank 0)."""
        return self.rank == 0


_CURRENT = Dist()


def current() -> Dist:
    """The run's :class:`Dist` (one process until :func:`init` set up another)."""
    return _CURRENT


def init(mode: str, device: str = "cpu") -> Dist:
    """Join torchrun's process group for ``mode`` and make it :func:`current`; ``none`` is one process.

    A run launched by torchrun with several processes but ``distributed: none`` is refused: each process would
    train alone and they would overwrite each other's files."""
    global _CURRENT
    if mode not in MODES:
        raise ValueError(f"distributed={mode!r}: choose one of {', '.join(MODES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if world > 1:
            raise ValueError(f"launched with {world} processes (WORLD_SIZE) but distributed: none — set "
                             "--distributed ddp or fsdp2, or launch one process")
        _CURRENT = Dist()
        return _CURRENT
    if "RANK" not in os.environ:
        raise ValueError(f"distributed: {mode} needs torchrun's environment (RANK, WORLD_SIZE); launch with "
                         "`torchrun --standalone --nproc_per_node N -m tether <command> ...`")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)  # "cuda" then means this rank's GPU
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if cuda else "gloo")
    _CURRENT = Dist(mode, tdist.get_rank(), tdist.get_world_size(), local_rank)
    return _CURRENT


def local_launch_args(nproc: int) -> list[str]:
    """torchrun arguments for ``nproc`` processes on this machine, meeting at 127.0.0.1 on a free port.

    ``--standalone`` advertises the machine's host name to the workers; where that name does not resolve (a
    sandbox whose ``hostname`` is missing from /etc/hosts) they never connect. The tests and benches launch with
    these instead."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port)]


def shutdown() -> None:
    """Leave the process group (after a barrier) and return to one process."""
    global _CURRENT
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
    _CURRENT = Dist()


def wrapped_training() -> bool:
    """True when gradients move through DDP / FSDP2 (in-place ``.grad`` writes would bypass them)."""
    return _CURRENT.active


def is_sharded(model: nn.Module) -> bool:
    """True when ``model``'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------
# The wrapper.
# ------------------------------------------------------------------------------------------------------------


class LossModule(nn.Module):
    """``forward(fn, *args, **kwargs) = fn(self.policy, *args, **kwargs)``: whatever a recipe computes from the
    policy (a loss and its metrics) runs inside the forward that DDP / FSDP2 wrap."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.policy, *args, **kwargs)


def _decoder_layers(policy: nn.Module) -> Sequence[nn.Module]:
    model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    return list(layers) if layers is not None else []


class Trainable:
    """The policy as the training loop uses it: ``trainable(fn, *args)`` computes ``fn(policy, *args)`` through the
    wrapper's forward (DDP, FSDP2, or nothing for one process).

    FSDP2 shards each decoder layer and then the root (the ``LossModule``: embeddings, final norm, LM head), the
    usual unit of ``fully_shard``. Create the optimizer after this (over ``policy.parameters()``, which are then
    shards)."""

    def __init__(self, policy: nn.Module, dist: Dist | None = None):
        self.dist = dist or current()
        self.policy = policy
        self._plain = None
        root: nn.Module = LossModule(policy)
        if self.dist.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            on_gpu = next(policy.parameters()).is_cuda
            root = DistributedDataParallel(root, device_ids=[self.dist.local_rank] if on_gpu else None)
        elif self.dist.mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            device_type = "cuda" if next(policy.parameters()).is_cuda else "cpu"
            # A plain twin for the no-grad passes (gathered): FSDP2's forward hooks communicate at every call, so
            # ranks sampling different numbers of tokens cannot call the sharded model directly.
            self._plain = copy.deepcopy(policy).requires_grad_(False).eval()
            mesh = init_device_mesh(device_type, (self.dist.world,))
            for layer in _decoder_layers(policy):
                fully_shard(layer, mesh=mesh)
            fully_shard(root, mesh=mesh)
            # Make the LossModule the root now: a layer called first (by a no-grad pass) would otherwise take that
            # role at its lazy initialization.
            root._get_fsdp_state()._lazy_init()
        self.root = root

    def __call__(self, fn: Callable, *args, **kwargs) -> Any:
        return self.root(fn, *args, **kwargs)

    @contextlib.contextmanager
    def sync(self, enabled: bool):
        """Synchronize gradients in the backward passes inside (``enabled``) or only accumulate them locally."""
        if self.dist.mode == "ddp" and not enabled:
            with self.root.no_sync():
                yield
            return
        if self.dist.mode == "fsdp2":
            self.root.set_requires_gradient_sync(enabled)
            try:
                yield
            finally:
                self.root.set_requires_gradient_sync(True)
            return
        yield

    @contextlib.contextmanager
    def gathered(self):
        """The model for no-grad passes that call the policy directly (sampling, scoring, evaluation): the policy
        itself, or under FSDP2 a plain copy into which the full weights are gathered on entry (a collective: every
        rank enters together; costs one full copy of the weights per rank)."""
        if self._plain is None:
            yield self.policy
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True))
        self._plain.load_state_dict(full, strict=False)
        del full
        with torch.no_grad():
            yield self._plain


# ------------------------------------------------------------------------------------------------------------
# Sharding and reduction.
# ------------------------------------------------------------------------------------------------------------


def shard_rows(rows, dist: Dist | None = None) -> tuple[Any, float]:
    """This rank's rows of a micro-batch, ``rows[rank::world]``, and their weight: 1.0, or 0.0 with a stand-in
    (the first row) when the micro-batch has fewer rows than ranks — every rank must still run a forward and a
    backward pass. ``rows`` is a list or a 1-D tensor of row indices."""
    d = dist or current()
    if d.world == 1:
        return rows, 1.0
    mine = rows[d.rank::d.world]
    if len(mine) == 0:
        return rows[:1], 0.0
    return mine, 1.0


def all_sum(values: dict[str, float], dist: Dist | None = None) -> dict[str, float]:
    """Each value summed over the ranks (float64; one all-reduce; keys must be the same on every rank)."""
    d = dist or current()
    if d.world == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_sum_(tensor: torch.Tensor, dist: Dist | None = None) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (e.g. per-row statistics each rank filled for its own rows)."""
    d = dist or current()
    if d.world > 1:
        moved = tensor.to(_comm_device())
        tdist.all_reduce(moved)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def gather_objects(obj: Any, dist: Dist | None = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    d = dist or current()
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, dist: Dist | None = None) -> Any:
    """Rank 0's ``obj`` on every rank."""
    d = dist or current()
    if d.world == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist: Dist | None = None) -> None:
    if (dist or current()).world > 1:
        tdist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
