"""Padding is inert in every policy objective (and every per-token helper that takes a mask).

Whatever sits at a masked position — a stale log-prob, the 0 of a zero-filled buffer, NaN from a log of 0, ±inf from
a −inf logit, an ``IGNORE_INDEX`` token id — must not reach the loss, the metrics or the gradient. Each case below is
run twice on the same ragged batch: once with 0 at every masked position of every per-token input, once with a junk
value there (NaN, +inf or −inf; token ids −100). The two runs must give bit-identical losses, metrics and gradients
(a masked position gets exactly zero gradient in both). A NaN anywhere in a junk run fails the comparison, because
NaN ≠ NaN.

Bit-identical is the right tolerance: inert padding means the junk is replaced by 0 *before* any arithmetic, so both
runs perform the same floating-point operations on the same numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.losses.policy import (
    aggregate,
    apo,
    archer,
    cpgd,
    critical_token_kl,
    dapo,
    disco,
    gpg,
    grpo,
    grpo_care_bonus,
    gvpo,
    kdrl,
    kl_in_reward,
    kl_penalty,
    ppo_clip,
    reinforce_pp_advantages,
    rpg,
    token_returns,
    troll,
    whiten,
)
from tether.losses.preference import sequential_risk

F64 = torch.float64
B, G, T, V = 6, 3, 7, 5
PER_TOKEN = ("logps", "old_logps", "ref_logps", "teacher_logps", "entropy", "token_kl", "token_rewards", "token_adv")
PER_VOCAB = ("logits", "old_logits", "ref_logits", "logps_full", "ref_logps_full")


def batch() -> dict[str, torch.Tensor]:
    """Ragged rows (a prompt offset and a response length per row; one row fully masked), float64 values."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, (start, length) in enumerate([(0, 7), (2, 3), (1, 1), (0, 4), (3, 0), (1, 5)]):
        mask[i, start : start + length] = True
    logps = -0.2 - 2.0 * torch.rand(B, T, generator=g, dtype=F64)
    logits = 2.0 * torch.randn(B, T, V, generator=g, dtype=F64)
    full = torch.log_softmax(logits, -1)
    ref_full = torch.log_softmax(logits + torch.randn(B, T, V, generator=g, dtype=F64), -1)
    return {
        "mask": mask,
        "logps": logps,
        "old_logps": logps + 0.3 * torch.randn(B, T, generator=g, dtype=F64),
        "ref_logps": logps + 0.3 * torch.randn(B, T, generator=g, dtype=F64),
        "teacher_logps": logps + 0.3 * torch.randn(B, T, generator=g, dtype=F64),
        "entropy": torch.rand(B, T, generator=g, dtype=F64),
        "token_kl": torch.rand(B, T, generator=g, dtype=F64),
        "token_rewards": torch.randn(B, T, generator=g, dtype=F64),
        "token_adv": torch.randn(B, T, generator=g, dtype=F64),
        "logits": logits,
        "old_logits": logits + 0.8 * torch.randn(B, T, V, generator=g, dtype=F64),
        "ref_logits": logits + 0.8 * torch.randn(B, T, V, generator=g, dtype=F64),
        "logps_full": full,
        "ref_logps_full": ref_full,
        "tokens": torch.randint(0, V, (B, T), generator=g),
        "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=F64),
        "advantages": torch.tensor([1.0, -0.5, 0.3, -1.2, 0.0, 0.8], dtype=F64),
    }


# name → (callable on the batch dict, differentiable inputs)
CASES = {
    "ppo_clip": (lambda b: ppo_clip(b["logps"], b["old_logps"], b["advantages"], b["mask"]), ("logps",)),
    "ppo_clip token advantages": (
        lambda b: ppo_clip(b["logps"], b["old_logps"], b["token_adv"], b["mask"], agg="seq-mean-token-mean"),
        ("logps",)),
    **{f"grpo {est}": (lambda b, est=est: grpo(b["logps"], b["old_logps"], b["advantages"], b["mask"],
                                                 ref_logps=b["ref_logps"], kl_estimator=est, token_kl=b["token_kl"]),
                       ("logps", "token_kl") if est == "exact" else ("logps",))
       for est in ("k1", "k2", "k3", "k3_is", "exact")},
    "grpo k2 importance-weighted": (
        lambda b: grpo(b["logps"], b["old_logps"], b["advantages"], b["mask"], ref_logps=b["ref_logps"],
                       kl_estimator="k2", kl_importance_weight=True), ("logps",)),
    "dapo": (lambda b: dapo(b["logps"], b["old_logps"], b["advantages"], b["mask"], dual_clip=10.0), ("logps",)),
    "gpg": (lambda b: gpg(b["logps"], b["old_logps"], b["advantages"], b["mask"]), ("logps",)),
    "cpgd": (lambda b: cpgd(b["logps"], b["old_logps"], b["advantages"], b["mask"]), ("logps",)),
    "kl_penalty k3_is": (lambda b: kl_penalty(b["logps"], b["ref_logps"], b["mask"], estimator="k3_is",
                                              old_logps=b["old_logps"]), ("logps",)),
    **{f"aggregate {mode}": (lambda b, mode=mode: aggregate(b["logps"], b["mask"], mode, 9), ("logps",))
       for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")},
    "kl_in_reward": (lambda b: kl_in_reward(b["token_rewards"], b["logps"], b["ref_logps"], b["mask"], coef=0.3,
                                            estimator="k3"), ()),
    "gvpo": (lambda b: gvpo(b["logps"], b["old_logps"], b["rewards"], b["mask"], group_size=G), ("logps",)),
    "disco logL kl": (lambda b: disco(b["logps"], b["old_logps"], b["rewards"], b["mask"], group_size=G, beta=50.0),
                      ("logps",)),
    "disco Lratio low_var_kl": (
        lambda b: disco(b["logps"], b["old_logps"], b["rewards"], b["mask"], group_size=G, score="Lratio",
                        kl_type="low_var_kl", beta=50.0), ("logps",)),
    **{f"rpg {style} {kl}": (lambda b, style=style, kl=kl: rpg(b["logps"], b["old_logps"], b["advantages"], b["mask"],
                                                               ref_logps=b["ref_logps"], kl=kl, style=style, beta=0.3),
                             ("logps",))
       for style in ("differentiable", "reinforce") for kl in ("rkl", "urkl", "fkl", "ufkl")},
    "rpg iterative reference": (lambda b: rpg(b["logps"], b["old_logps"], b["advantages"], b["mask"], kl="ufkl",
                                              style="differentiable", beta=0.3), ("logps",)),
    **{f"kdrl {est}": (lambda b, est=est: kdrl(b["logps"], b["old_logps"], b["teacher_logps"], b["rewards"],
                                                b["mask"], group_size=G, beta=0.4, estimator=est), ("logps",))
       for est in ("k1", "k2", "k3")},
    "apo": (lambda b: apo(b["logps"], b["old_logps"], b["ref_logps"], b["rewards"], b["mask"], group_size=G,
                          beta=0.5), ("logps",)),
    "troll": (lambda b: troll(b["logits"], b["old_logits"], b["tokens"], b["advantages"], b["mask"],
                              max_support=3, support_mass=0.9), ("logits",)),
    "archer entropy": (lambda b: archer(b["logps"], b["old_logps"], b["ref_logps"], b["advantages"], b["mask"],
                                        entropy=b["entropy"], kl_coef_high_entropy=0.1), ("logps",)),
    "archer logits": (lambda b: archer(b["logps"], b["old_logps"], b["ref_logps"], b["advantages"], b["mask"],
                                       logits=b["logits"], kl_coef_high_entropy=0.1), ("logps",)),
    **{f"critical_token_kl {est}": (lambda b, est=est: critical_token_kl(b["logps"], b["ref_logps"], b["ref_logits"],
                                                                           b["mask"], estimator=est, rho=3.0),
                                    ("logps",))
       for est in ("k1", "k2", "k3")},
    "grpo_care_bonus": (lambda b: grpo_care_bonus(b["rewards"], b["ref_logps"], b["mask"], group_size=G), ()),
    # advantage estimators on token rewards: data, no gradient — the output itself must not change
    "token_returns": (lambda b: token_returns(b["token_rewards"], b["mask"], gamma=0.9), ()),
    "whiten": (lambda b: whiten(b["token_rewards"], b["mask"]), ()),
    "reinforce_pp_advantages": (lambda b: reinforce_pp_advantages(b["token_rewards"], b["mask"]), ()),
    "reinforce_pp_advantages baseline": (
        lambda b: reinforce_pp_advantages(b["token_rewards"], b["mask"], baseline=True, group_size=G), ()),
    **{f"sequential_risk split={split}": (
        lambda b, split=split: sequential_risk(b["logps_full"], b["ref_logps_full"], b["mask"], confidence_level=0.6,
                                               split_vocab=split), ("logps_full",))
       for split in (False, True)},
}


def run(case: str, fill: float):
    """Loss (or output tensor), metrics and gradients with ``fill`` at every masked position of every input."""
    fn, diff = CASES[case]
    b = batch()
    pad = ~b["mask"]
    for name in PER_TOKEN:
        b[name] = b[name].masked_fill(pad, fill)
    for name in PER_VOCAB:
        b[name] = b[name].masked_fill(pad[..., None], fill)
    b["tokens"] = b["tokens"].masked_fill(pad, 0 if fill == 0 else -100)
    for name in diff:
        b[name].requires_grad_(True)
    out = fn(b)
    loss, metrics = (out.loss, out.metrics) if hasattr(out, "metrics") else (out, {})
    grads = torch.autograd.grad(loss.sum(), [b[n] for n in diff]) if diff else ()
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("fill", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("case", list(CASES))
def test_padding_is_inert(case, fill):
    loss0, metrics0, grads0 = run(case, 0.0)
    loss, metrics, grads = run(case, fill)
    assert torch.isfinite(loss0).all(), f"{case}: the zero-padded reference run is not finite"
    assert torch.equal(loss, loss0), f"{case}: loss {loss} with {fill} padding != {loss0} with zeros"
    assert metrics == metrics0, f"{case}: metrics differ:\n  {metrics}\n  {metrics0}"
    mask = batch()["mask"]
    for g, g0 in zip(grads, grads0):
        assert torch.equal(g, g0), f"{case}: gradient differs with {fill} padding (NaN at {g.isnan().nonzero()[:5]})"
        pad = ~mask if g.dim() == 2 else ~mask[..., None].expand_as(g)
        assert (g[pad] == 0).all(), f"{case}: masked positions receive gradient"
