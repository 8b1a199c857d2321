"""Q-probe: a linear value head on the model's own embeddings, used to pick among k samples.

Li, Jelassi, Zhang, Kakade, Wattenberg, Brandfonbrener 2024, "Q-Probe: A Lightweight Approach to Reward
Maximization for Language Models" (ICML, arXiv:2402.14688; code likenneth/q_probe). Q(x, y) = wᵀφ(x, y) + b with
φ the embedding of prompt + completion; at inference draw k completions from the model and keep one with
probability softmax(Q/τ) (argmax at τ = 0). As k → ∞ this samples π_ref·exp(Q/τ)/Z, the KL-regularized maximizer of
Q (the paper's motivation); k = 1 or τ = ∞ is exactly the base model.

φ here is the final hidden state (after the final norm) at the last token of the completion — the paper probes a
chosen layer's last-token state; the last layer is what ``tether.logprobs.hidden_states`` gives without hooks.
Features are standardized with the training set's mean and scale (kept in the probe).

Training, two ways (each a convex problem solved to its optimum here, where the paper runs Adam):

* from rewards: ridge regression, min (1/n)·Σ (Q(φ_i) − r_i)² + λ‖w‖² (the paper's "mse" reward-modeling loss
  plus an L2 term; closed form);
* from preferences: Bradley–Terry, min −(1/n)·Σ log σ(Q(φ_chosen) − Q(φ_rejected)) + λ‖w‖² (the paper's
  preference loss; L-BFGS).

Left out: the paper's policy-gradient ("pg") objective and MLP probes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tether.inference.select import Selection, soft_best_of_n
from tether.logprobs import hidden_states
from tether.rollout import collate
from tether.sampling import Completions

__all__ = ["QProbe", "completion_features", "fit_qprobe_preferences", "fit_qprobe_rewards", "qprobe_select"]


class QProbe(torch.nn.Module):
    """Q(φ) = wᵀ((φ − mean)/scale) + b; ``forward`` maps features (B, H) → (B,)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim, 1, dtype=torch.float64)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(dim, dtype=torch.float64))

    def standardize(self, features: Tensor) -> Tensor:
        return (features.double() - self.mean) / self.scale

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.standardize(features)).squeeze(-1)

    def fit_scaling(self, features: Tensor) -> None:
        """Take the standardization from ``features`` (B, H); a constant feature keeps scale 1."""
        f = features.double()
        self.mean.copy_(f.mean(0))
        std = f.std(0, unbiased=False)
        self.scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"dim": self.mean.numel(), "state": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path) -> QProbe:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        probe = cls(int(blob["dim"]))
        probe.load_state_dict(blob["state"])
        return probe


@torch.no_grad()
def completion_features(model, done: Completions, pad_token_id: int, *, batch_size: int = 16) -> Tensor:
    """(B, H) float64: the final hidden state at the last token of each prompt + completion of ``done`` (a
    completion's last token is its end-of-sequence token when it finished)."""
    device = next(model.parameters()).device
    rollout = collate(done, pad_token_id, device)
    out = []
    for start in range(0, rollout.size, batch_size):
        mb = rollout.rows(torch.arange(start, min(rollout.size, start + batch_size)))
        h = hidden_states(model, mb.input_ids, mb.attention_mask)
        last = mb.attention_mask.sum(-1) - 1
        out.append(h[torch.arange(mb.size, device=h.device), last].double().cpu())
    return torch.cat(out)


def fit_qprobe_rewards(features: Tensor, rewards: Tensor, *, l2: float = 1e-3) -> QProbe:
    """Ridge regression of ``rewards`` (B,) on standardized ``features`` (B, H): w = (XᵀX/n + λI)⁻¹Xᵀ(r − r̄)/n,
    b = r̄ (X centred, so the bias is unpenalized)."""
    features, rewards = features.double(), torch.as_tensor(rewards, dtype=torch.float64)
    if features.dim() != 2 or rewards.shape != features.shape[:1]:
        raise ValueError(f"fit_qprobe_rewards: features (B, H) and rewards (B,), got {tuple(features.shape)} and "
                         f"{tuple(rewards.shape)}")
    probe = QProbe(features.shape[1])
    probe.fit_scaling(features)
    x = probe.standardize(features)
    n, d = x.shape
    gram = x.T @ x / n + l2 * torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve(gram, x.T @ (rewards - rewards.mean()) / n)
    with torch.no_grad():
        probe.linear.weight.copy_(w[None, :])
        probe.linear.bias.fill_(float(rewards.mean()))
    return probe


def fit_qprobe_preferences(chosen: Tensor, rejected: Tensor, *, l2: float = 1e-3, max_iter: int = 500) -> QProbe:
    """Bradley–Terry fit on pairs: ``chosen`` and ``rejected`` features (B, H) (row i preferred to row i). The bias
    cancels in Q(chosen) − Q(rejected) and stays 0. Convex; L-BFGS to its optimum in float64."""
    chosen, rejected = chosen.double(), rejected.double()
    if chosen.shape != rejected.shape or chosen.dim() != 2:
        raise ValueError(f"fit_qprobe_preferences: chosen and rejected must both be (B, H), got "
                         f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")
    probe = QProbe(chosen.shape[1])
    probe.fit_scaling(torch.cat([chosen, rejected]))
    diff = probe.standardize(chosen) - probe.standardize(rejected)
    w = torch.zeros(chosen.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(diff @ w).mean() + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        probe.linear.weight.copy_(w.detach()[None, :])
    return probe


def qprobe_select(q: Tensor, tau: float, scored: Tensor | None = None, *,
                  generator: torch.Generator | None = None) -> Selection:
    """Keep candidate i of each prompt with probability softmax(q/τ)_i over its k candidates (q: (P, k)); τ = 0
    keeps the argmax (ties uniformly), τ = inf a uniformly random one — the base law."""
    return soft_best_of_n(q, tau, scored, generator=generator)
