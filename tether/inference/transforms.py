"""Reward transforms measured against the reference policy: calibration, InfAlign's CTRL, and the vBoN reward.

**Calibration** (InfAlign: Balashankar et al. 2025, "Inference-aware language model alignment", ICML,
arXiv:2412.19792): a reward r(x, y) becomes its quantile among the rewards of reference samples for the same
prompt, C(x, y) ∈ [0, 1]. We count ties ½:

    C(x, y) = P_{z~π_ref}(r(x,z) < r(x,y)) + ½·P_{z~π_ref}(r(x,z) = r(x,y)),   estimated on K reference samples,

so that E_{y~π}[C] is exactly π's win rate against π_ref with ties counted ½ (for an atomless reward every
convention agrees; the paper's statement uses ≤ — our tie rule is a departure for rewards with atoms, such as the
rule rewards). C is unchanged by any strictly increasing map of r.

**CTRL transforms** (same paper): KL-regularized RL on Φ(C) with Φ chosen for the procedure the model is deployed
with — the identity for plain sampling (standard win rate), Φ(u) = exp(t·u) for best-of-N, Φ(u) = −exp(−t·u) for
worst-of-N (best-of-N jailbreaking). The paper tunes t per N and β; we do not ship its values (``t`` is a
parameter). Signs and forms follow the paper's description of exponential transforms with positive (BoN) and
negative (WoN) exponents.

**vBoN** (Amini, Vieira, Cotterell 2024, "Variational Best-of-N Alignment", arXiv:2407.06057; code rycolab/vbon):
fine-tune toward the best-of-N law itself by minimizing KL(π_θ‖π_BoN). Its lower bound is KL-regularized RL with
reward log F⁻(y) (the reference probability of a strictly lower reward) and β = 1/(N − 1): set the RL recipe's
``kl_coef`` accordingly. F⁻ is estimated from K reference samples with the released code's add-one smoothing,
F̂⁻ = (#{reference rewards < r} + 1)/(K + 1), so log F̂⁻ is finite. :func:`vbon_exact_reward` is the exact
objective's reward, log π_BoN(y) − log π_ref(y), for when the reference log-prob and F, F⁻ are known.

:class:`ReferenceCalibration` applies any of these inside ``tether rl`` (``reward_transform`` in its config): the
reference samples for a prompt are drawn (and scored) the first time the prompt is seen and cached, so the table is
π_ref's, never the moving policy's.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["REWARD_TRANSFORMS", "ReferenceCalibration", "calibrate", "check_reward_transform", "ctrl_bon",
           "ctrl_won", "transform_rewards", "vbon_exact_reward", "vbon_reward"]


def calibrate(rewards: Tensor, ref_rewards: Tensor) -> Tensor:
    """Calibrated rewards (module docstring): ``rewards`` (..., B) against reference rewards (..., K) of the same
    prompt(s) → (..., B) in [0, 1], (#{ref < r} + ½·#{ref = r}) / K. Example: ref (0, 1, 1, 2), r = 1 → (1 + 1)/4."""
    rewards, ref = torch.as_tensor(rewards, dtype=torch.float64), torch.as_tensor(ref_rewards, dtype=torch.float64)
    if ref.shape[-1] < 1:
        raise ValueError("calibrate: no reference rewards")
    below = (ref[..., None, :] < rewards[..., :, None]).sum(-1, dtype=torch.float64)
    equal = (ref[..., None, :] == rewards[..., :, None]).sum(-1, dtype=torch.float64)
    return (below + 0.5 * equal) / ref.shape[-1]


def ctrl_bon(rewards: Tensor, ref_rewards: Tensor, t: float = 1.0) -> Tensor:
    """CTRL's best-of-N transform exp(t·C), t > 0."""
    return torch.exp(t * calibrate(rewards, ref_rewards))


def ctrl_won(rewards: Tensor, ref_rewards: Tensor, t: float = 1.0) -> Tensor:
    """CTRL's worst-of-N transform −exp(−t·C), t > 0 (raises the lower tail most)."""
    return -torch.exp(-t * calibrate(rewards, ref_rewards))


def vbon_reward(rewards: Tensor, ref_rewards: Tensor) -> Tensor:
    """vBoN's lower-bound reward log F̂⁻(y), F̂⁻ = (#{ref < r} + 1)/(K + 1) (module docstring); use with
    β = 1/(N − 1)."""
    rewards, ref = torch.as_tensor(rewards, dtype=torch.float64), torch.as_tensor(ref_rewards, dtype=torch.float64)
    below = (ref[..., None, :] < rewards[..., :, None]).sum(-1, dtype=torch.float64)
    return torch.log((below + 1.0) / (ref.shape[-1] + 1.0))


def vbon_exact_reward(ref_logprob: Tensor, cdf_below: Tensor, n: int) -> Tensor:
    """The exact vBoN reward log π_BoN(y) − log π_ref(y), with π_BoN(y) = Σ_{i=1..n} C(n,i)·F⁻(y)^{n−i}·
    π_ref(y)^i (the binomial form of F^n − F⁻^n for distinct rewards, as the rycolab/vbon code builds it), in log
    space. ``ref_logprob`` log π_ref(y), ``cdf_below`` F⁻(y); same shapes. Maximizing E_π[this] − KL(π‖π_ref) is
    minimizing KL(π‖π_BoN); its i = 1 term alone gives log n + (n − 1)·log F⁻, the bound :func:`vbon_reward`
    optimizes."""
    lp = torch.as_tensor(ref_logprob, dtype=torch.float64)
    log_below = torch.log(torch.as_tensor(cdf_below, dtype=torch.float64))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    log_binom = math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
    # (n − i)·log F⁻ with 0·log 0 = 0 at i = n.
    below_term = torch.where(i == n, torch.zeros_like(i), (n - i) * log_below[..., None])
    terms = log_binom + below_term + i * lp[..., None]
    return torch.logsumexp(terms, -1) - lp


def _identity(rewards: Tensor, ref_rewards: Tensor) -> Tensor:
    return torch.as_tensor(rewards, dtype=torch.float64)


REWARD_TRANSFORMS: dict[str, Callable[..., Tensor]] = {
    "none": _identity, "calibrate": calibrate, "ctrl_bon": ctrl_bon, "ctrl_won": ctrl_won, "vbon": vbon_reward}
"""Transform by name: ``fn(rewards (..., B), ref_rewards (..., K), **args) -> (..., B)``."""


def check_reward_transform(name: str | None, args: dict) -> None:
    """Raise ``ValueError`` naming the problem when ``name`` is unknown or ``args`` are not its parameters."""
    if name is None:
        if args:
            raise ValueError(f"reward_transform_args {args} given without a reward_transform")
        return
    if name not in REWARD_TRANSFORMS:
        raise ValueError(f"reward_transform: unknown {name!r}; choose one of {sorted(REWARD_TRANSFORMS)}")
    allowed = set(inspect.signature(REWARD_TRANSFORMS[name]).parameters) - {"rewards", "ref_rewards"}
    unknown = set(args) - allowed - {"samples"}
    if unknown:
        raise ValueError(f"reward_transform_args: {sorted(unknown)} are not parameters of {name!r}; it takes "
                         f"{sorted(allowed | {'samples'})} (samples = reference samples per prompt)")
    if "t" in args and not args["t"] > 0:
        raise ValueError(f"reward_transform_args: t={args['t']} must be > 0")
    if "samples" in args and not (isinstance(args["samples"], int) and args["samples"] >= 1):
        raise ValueError(f"reward_transform_args: samples={args['samples']} must be an int ≥ 1")


def transform_rewards(name: str, rewards: Tensor, ref_rewards: Tensor, **args) -> Tensor:
    """``REWARD_TRANSFORMS[name](rewards, ref_rewards, **args)``."""
    return REWARD_TRANSFORMS[name](rewards, ref_rewards, **args)


class ReferenceCalibration:
    """The reward transform of ``tether rl``: rewards of each group → ``name``'s transform against ``samples``
    reference completions of the group's prompt (drawn once per prompt with the reference model, scored by the run's
    reward, cached).

    Called on a ``tether.rollout.RewardedBatch`` right after the rewards are computed; returns a new one whose
    scored rewards are transformed, whose no-opinion rows hold their group's mean of the transformed values, and
    whose uniform groups (and, with ``drop_uniform_groups``, loss mask) are recomputed — a transform can make two
    different rewards equal (both above every reference sample calibrate to 1). A prompt whose reference samples
    all have no opinion falls back to its raw rewards, counted in ``uncalibrated_prompts``.
    """

    def __init__(self, name: str, args: dict, *, reference, tokenizer, reward, max_new_tokens: int,
                 temperature: float, seed: int, batch_size: int, stop_strings: Sequence[str] = ()):
        check_reward_transform(name, args)
        args = dict(args)
        self.samples = int(args.pop("samples", 16))
        self.name, self.args = name, args
        self.reference, self.tokenizer, self.reward = reference, tokenizer, reward
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                             stop_strings=tuple(stop_strings))
        self.seed = seed
        self.tables: dict[str, Tensor] = {}
        self.uncalibrated_prompts = 0

    @staticmethod
    def key(row: dict) -> str:
        return json.dumps(row["prompt"], sort_keys=True)

    def ensure_tables(self, rows: Sequence[dict]) -> None:
        """Draw and score reference samples for the prompts of ``rows`` not seen before (one sampling call)."""
        from tether.reference import reference_context
        from tether.rollout import score_completions
        from tether.sampling import render_prompts, sample

        new = list({self.key(r): r for r in rows if self.key(r) not in self.tables}.values())
        if not new:
            return
        with reference_context(self.reference):
            done = sample(self.reference, self.tokenizer, render_prompts(self.tokenizer, [r["prompt"] for r in new]),
                          n=self.samples, seed=self.seed * 7_907 + len(self.tables), desc="calibration samples",
                          **self.sampling)
        raw = score_completions(self.reward, new, done)
        for i, row in enumerate(new):
            vals = [v for v in raw[i * self.samples:(i + 1) * self.samples] if v is not None]
            # Rounded as the batch's rewards are (float32, ``tether.rollout.fill_no_opinion``), so that a policy
            # sample and a reference sample with the same reward compare as a tie.
            self.tables[self.key(row)] = torch.tensor(vals, dtype=torch.float32).double()

    def __call__(self, batch, rows: Sequence[dict], *, group_size: int, drop_uniform_groups: bool):
        self.ensure_tables(rows)
        rewards = batch.rewards.detach().cpu().double().clone()
        scored = batch.scored.cpu()
        for g, row in enumerate(rows):
            table = self.tables[self.key(row)]
            sl = slice(g * group_size, (g + 1) * group_size)
            if len(table) == 0:
                self.uncalibrated_prompts += 1
                continue
            new = transform_rewards(self.name, rewards[sl], table, **self.args)
            keep = scored[sl]
            fill = new[keep].mean() if keep.any() else torch.tensor(0.0, dtype=torch.float64)
            rewards[sl] = torch.where(keep, new, fill)
        rewards = rewards.to(batch.rewards.dtype)  # uniform groups are judged on the values the loss will see
        uniform = rewards.view(-1, group_size).std(dim=1) == 0
        keep = scored & ~uniform.repeat_interleave(group_size) if drop_uniform_groups else scored
        mask = batch.rollout.mask
        return dataclasses.replace(batch, rewards=rewards.to(batch.rewards.device), uniform=uniform,
                                   loss_mask=mask & keep.to(mask.device)[:, None])
