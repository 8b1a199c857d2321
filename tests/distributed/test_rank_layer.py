"""tether.distributed without processes: row dealing, launch checks, and the in-place gradient shortcut turned off
under a wrapper (the 2-process tests show the wrapped path matches one process; here, that it is the one taken)."""

from __future__ import annotations

import pytest
import torch

from tether import distributed
from tether.distributed import Dist, shard_rows
from tether.logprobs import backbone_inputs
from tether.testing import tiny_model


def test_rows_are_dealt_round_robin_and_cover_the_micro_batch_once():
    rows = list(range(7))
    parts = [shard_rows(rows, Dist("ddp", r, 3)) for r in range(3)]
    assert parts == [([0, 3, 6], 1.0), ([1, 4], 1.0), ([2, 5], 1.0)]
    assert sorted(x for p, _ in parts for x in p) == rows


def test_a_rank_without_rows_runs_a_zero_weight_stand_in():
    """Every rank must run a forward and backward pass (DDP / FSDP2 wait for all); a micro-batch of 1 row on 2
    ranks gives rank 1 the first row with weight 0."""
    idx = torch.tensor([5])
    mine, weight = shard_rows(idx, Dist("ddp", 1, 2))
    assert mine.tolist() == [5] and weight == 0.0
    assert shard_rows(idx, Dist("ddp", 0, 2))[1] == 1.0


def test_launch_errors_name_the_fix(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="set --distributed ddp or fsdp2"):
        distributed.init("none")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        distributed.init("ddp")
    with pytest.raises(ValueError, match="choose one of none, ddp, fsdp2"):
        distributed.init("zero3")


def test_embedding_gradient_goes_through_autograd_under_a_wrapper(monkeypatch):
    """One process: the shortcut applies (``inputs_embeds`` whose hook writes ``.grad``). In a distributed run it
    must not: DDP's reducer and FSDP2's reduce-scatter only see gradients autograd produces."""
    model = tiny_model().train()
    backbone = model.get_decoder()
    ids = torch.tensor([[3, 4, 5]])
    assert "inputs_embeds" in backbone_inputs(backbone, ids, True)
    monkeypatch.setattr(distributed, "_CURRENT", Dist("ddp", 0, 2))
    assert backbone_inputs(backbone, ids, True) == {"input_ids": ids}
