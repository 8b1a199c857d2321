"""Weight-space merging of Hugging Face model directories, with the exact KL of the result to each input.

    tether merge --config configs/merge_warp.yaml [--method soup --models A B C --weights 0.5 0.3 0.2 ...]

Every input is a model directory (safetensors; the embedded model by name); the output is a model directory
(``model.safetensors``, the first input's config and tokenizer). Methods, on the flat weights θ of each tensor:

* ``soup`` — θ = Σ_i w_i·θ_i, uniform w_i = 1/n unless ``weights`` are given (model soups, Wortsman et al. 2022;
  SALSA's reference, Chegini et al. 2024). The averaging is ``tether.reference.soup_state``.
* ``slerp`` — spherical interpolation of two task vectors δ_i = θ_i − θ_base (WARP, Ramé et al. 2024,
  arXiv:2406.16768): with Ω the angle between δ_1 and δ_2,
  θ = θ_base + sin((1 − λ)Ω)/sin Ω · δ_1 + sin(λΩ)/sin Ω · δ_2.
  Orthogonal task vectors of equal norm at λ = ½ get √½ each (norm kept; a linear average would give ½ each and
  shrink the merged update by √2). Applied tensor by tensor (Ω per tensor, as mergekit's SLERP does; whether WARP
  takes one angle over the whole model or one per layer is not checked here — a possible departure). A tensor
  whose task vectors are zero or (anti)parallel (sin Ω < 1e-6) is merged linearly, (1 − λ)·δ_1 + λ·δ_2: for
  parallel vectors that is the formula's limit as Ω → 0; for antiparallel ones the formula has no limit and the
  linear average is a choice. Such tensors are counted in the report.
* then, for any method, ``eta`` — WARP's LITI, "linear interpolation towards the initialization":
  θ_η = (1 − η)·θ_base + η·θ. η = 1 leaves θ unchanged, η = 0 returns the base.

Refused with a one-line error naming the directories and the tensor: different tensor names or shapes (models of
different architectures). Weights are loaded and merged in fp32 (accumulated in float64) whatever their stored
dtype.

With ``prompts_file`` set, completions are sampled from the merged model on those held-out prompts and the exact
token-level KL(merged ‖ input) — the full sum over the vocabulary at every sampled position, with 95% CIs
(``tether.eval.kl.completions_kl``) — is measured against every input and the base, on the same completions;
everything goes to ``merge_report.json`` in the output directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from tether.reference import check_same_tensors, soup_state

__all__ = ["liti", "merge_states", "run", "slerp", "slerp_coefficients"]

# sin Ω below this: the two task vectors are (anti)parallel to fp64 precision and SLERP is taken as its limit.
_PARALLEL = 1e-6


def slerp_coefficients(delta_1: Tensor, delta_2: Tensor, t: float) -> tuple[float, float, float]:
    """``(c_1, c_2, Ω)`` with SLERP's merged task vector c_1·δ_1 + c_2·δ_2 at interpolation λ = ``t``.

    Ω = arccos(⟨δ_1, δ_2⟩ / (‖δ_1‖ ‖δ_2‖)) over the flattened tensors (computed in float64); c_1 = sin((1 − t)Ω)/sin Ω,
    c_2 = sin(tΩ)/sin Ω (WARP, Ramé et al. 2024, the SLERP of §3). Where Ω is undefined (a zero task vector) or
    sin Ω < 1e-6 the linear limit (1 − t, t) is returned with Ω = nan. Example: orthogonal vectors (Ω = π/2) at
    t = ½ give c_1 = c_2 = sin(π/4)/1 = √½.
    """
    a, b = delta_1.reshape(-1).to(torch.float64), delta_2.reshape(-1).to(torch.float64)
    na, nb = a.norm().item(), b.norm().item()
    if na == 0.0 or nb == 0.0:
        return 1.0 - t, t, math.nan
    cos = max(-1.0, min(1.0, (a @ b).item() / (na * nb)))
    omega = math.acos(cos)
    if math.sin(omega) < _PARALLEL:
        return 1.0 - t, t, math.nan
    return math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega), omega


def slerp(base: dict[str, Tensor], first: dict[str, Tensor], second: dict[str, Tensor], t: float
          ) -> tuple[dict[str, Tensor], dict]:
    """SLERP of the task vectors ``first − base`` and ``second − base``, tensor by tensor (:func:`slerp_coefficients`).
    Returns the merged state dict and what happened: per-tensor (c_1, c_2, Ω) and how many tensors fell back to
    the linear limit. Non-floating tensors must agree and are copied."""
    out, detail, linear = {}, {}, 0
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = first[name].clone()
            continue
        d1 = first[name].to(torch.float64) - b.to(torch.float64)
        d2 = second[name].to(torch.float64) - b.to(torch.float64)
        c1, c2, omega = slerp_coefficients(d1, d2, t)
        linear += math.isnan(omega)
        detail[name] = {"c1": c1, "c2": c2, "omega": omega}
        out[name] = (b.to(torch.float64) + c1 * d1 + c2 * d2).to(b.dtype)
    return out, {"tensors": detail, "linear_fallback_tensors": linear}


def liti(base: dict[str, Tensor], merged: dict[str, Tensor], eta: float) -> dict[str, Tensor]:
    """LITI (WARP, Ramé et al. 2024): θ_η = (1 − η)·θ_base + η·θ_merged, tensor by tensor, in float64. η = 0 is
    the base and η = 1 the merged model, exactly."""
    if eta == 1.0:
        return {k: v.clone() for k, v in merged.items()}
    if eta == 0.0:
        return {k: v.clone() for k, v in base.items()}
    return soup_state([base, merged], [1.0 - eta, eta], names=["base", "merged"])


def merge_states(method: str, states: list[dict[str, Tensor]], names: list[str], *, weights: list[float] | None = None,
                 base: dict[str, Tensor] | None = None, t: float = 0.5, eta: float = 1.0) -> tuple[dict, dict]:
    """The merged state dict of ``states`` (named ``names`` in errors) and a report of how it was formed."""
    check_same_tensors(states + ([base] if base is not None else []), names + (["base"] if base is not None else []))
    if method == "soup":
        weights = weights if weights is not None else [1.0 / len(states)] * len(states)
        merged, detail = soup_state(states, weights, names=names), {"weights": weights}
    elif method == "slerp":
        if len(states) != 2 or base is None:
            raise ValueError(f"method slerp merges the task vectors of exactly 2 models relative to a base; got "
                             f"{len(states)} models and base={'set' if base is not None else 'None'} — set models "
                             "to two directories and base to their common initialization")
        merged, detail = slerp(base, states[0], states[1], t)
        omegas = [d["omega"] for d in detail["tensors"].values() if not math.isnan(d["omega"])]
        detail = {"t": t, "linear_fallback_tensors": detail["linear_fallback_tensors"],
                  "mean_omega": sum(omegas) / len(omegas) if omegas else None}
    else:
        raise ValueError(f"method: {method!r} is not one of soup, slerp")
    if eta != 1.0:
        if base is None:
            raise ValueError("eta: LITI interpolates towards the initialization; set base to that model directory "
                             "(or eta to 1)")
        merged = liti(base, merged, eta)
    return merged, {"method": method, "eta": eta, **detail}


def run(cfg) -> dict:
    """``tether merge``: load, merge, save, measure (``cfg`` is a ``tether.recipes.analysis_configs.MergeConfig``)."""
    from tether.checkpoints import save_pretrained_atomic
    from tether.eval.kl import completions_kl, format_kl_report
    from tether.models import load_model, load_tokenizer
    from tether.sampling import render_prompts, sample

    names = list(cfg.models)
    models = [load_model(m) for m in names]
    base_model = load_model(cfg.base) if cfg.base else None
    states = [m.state_dict() for m in models]
    merged_state, report = merge_states(cfg.method, states, names, weights=cfg.weights,
                                        base=None if base_model is None else base_model.state_dict(), t=cfg.t,
                                        eta=cfg.eta)
    merged = load_model(names[0])
    merged.load_state_dict(merged_state)
    tokenizer = load_tokenizer(names[0])
    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_pretrained_atomic(merged, tokenizer, out)
    report.update(models=names, base=cfg.base, output=str(out))
    print(f"merged {len(names)} models ({cfg.method}{'' if cfg.eta == 1 else f', LITI η = {cfg.eta}'}) into {out}")
    if cfg.prompts_file:
        from tether.data import load_prompts

        prompts = load_prompts(cfg.prompts_file)
        merged.to(cfg.device)
        done = sample(merged, tokenizer, render_prompts(tokenizer, prompts), n=cfg.kl_samples_per_prompt,
                      max_new_tokens=cfg.kl_max_new_tokens, temperature=1.0, seed=cfg.seed,
                      batch_size=cfg.batch_size)
        report["kl_to"] = {}
        for name, model in [*zip(names, models), *([("base:" + cfg.base, base_model)] if cfg.base else [])]:
            kl = completions_kl(merged, model.to(cfg.device), tokenizer, done, prompts=len(prompts),
                                max_new_tokens=cfg.kl_max_new_tokens, batch_size=cfg.batch_size)
            report["kl_to"][name] = kl
            print(f"to {name}: " + format_kl_report(kl).replace("policy", "merged").replace("reference", name))
    (out / "merge_report.json").write_text(json.dumps(report, indent=2))
    return report
