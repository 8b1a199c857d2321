"""Where did training move the weights? Per-matrix update diagnostics of a trained model against its base.

    tether diagnose --base smollm2-135m-instruct --trained runs/grpo_instructions/final [--subspace_rank 16]

For every weight matrix W (base) and W' (trained) with update Δ = W' − W, in float64:

* **update norm** ‖Δ‖_F and **relative** ‖Δ‖_F / ‖W‖_F;
* **sparsity**: the share of entries exactly unchanged (Δ_ij = 0 in the stored values) and the share below a
  relative tolerance, |Δ_ij| ≤ tol·|W_ij| (default tol = 2⁻⁹, half of bf16's relative spacing: an update a bf16 copy
  of the weights could not register — the precision effect "The Path Not Taken" (Zhu et al. 2025, arXiv:2511.08567)
  identifies behind RLVR's apparent sparsity);
* **spectral drift**: the top singular values σ_1..σ_k of W and W' and the largest relative change
  max_i |σ'_i − σ_i| / σ_i;
* **principal-subspace rotation**: the principal angles between the top-k left singular subspaces of W and W'
  (θ_i = arccos of the singular values of U_kᵀU'_k), and the same for the right ones; the largest angle, in degrees;
* **share of the update outside the base's top-k principal subspace**:

      off_principal_share = ‖(I − U_kU_kᵀ) Δ (I − V_kV_kᵀ)‖²_F / ‖Δ‖²_F

  with U_k, V_k the base's top-k left and right singular vectors. The four blocks P_U Δ P_V, P_U Δ P_V^⊥,
  P_U^⊥ Δ P_V, P_U^⊥ Δ P_V^⊥ are orthogonal in the Frobenius inner product, so this is exactly the fraction of the
  update's energy that touches neither the principal column space nor the principal row space. An update planted
  as U_k A V_kᵀ reads 0; one planted as U_⊥ B V_⊥ᵀ reads 1; an unchanged matrix has no share (null). For reading
  it, the report gives beside it the share of an isotropic update (i.i.d. entries, no preferred direction):
  E‖P_U⊥ Δ P_V⊥‖² / E‖Δ‖² = tr(P_U⊥)·tr(P_V⊥) / (mn) = (1 − k/m)(1 − k/n) — 0.962 for a 576 × 1536 matrix at
  k = 16; a share below it leans towards the principal directions, above it away from them.

Departure from the paper: "The Path Not Taken" characterises RLVR's updates as off-principal through the overlap of
the updated entries with the base's "principal weights" (an entry mask built from the rank-k part of W) and through
spectral drift and subspace rotation; the energy share above is a basis-free, exact quantity of the same question
(which we could check with planted updates), not the paper's mask statistic.

Only 2-D floating tensors are matrices here; the others (norm weights, biases) enter the totals. A tensor stored
under two names (tied embedding and LM head) counts once. ``diagnose.json`` holds every matrix and the totals;
``diagnose.png`` plots relative update norm, off-principal share, the largest principal angle and spectral drift
per matrix, in the model's order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["diagnose_states", "isotropic_off_principal_share", "matrix_diagnostics", "off_principal_share",
           "principal_angles", "run"]

BF16_HALF_SPACING = 2.0 ** -9


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """(k,) principal angles (radians, ascending) between the column spans of the orthonormal (n, k) bases ``a``
    and ``b``: arccos of the singular values of aᵀb (clamped to [0, 1] against rounding)."""
    cos = torch.linalg.svdvals(a.T @ b).clamp(0.0, 1.0)
    return torch.arccos(cos)  # svdvals are descending, so the angles ascend


def off_principal_share(delta: Tensor, u_k: Tensor, v_k: Tensor) -> float | None:
    """‖(I − U_kU_kᵀ) Δ (I − V_kV_kᵀ)‖²_F / ‖Δ‖²_F (module docstring); None for Δ = 0.
    Shapes: delta (m, n), u_k (m, k), v_k (n, k), orthonormal columns."""
    total = (delta * delta).sum().item()
    if total == 0.0:
        return None
    left = delta - u_k @ (u_k.T @ delta)
    outside = left - (left @ v_k) @ v_k.T
    return (outside * outside).sum().item() / total


def matrix_diagnostics(base: Tensor, trained: Tensor, *, k: int = 16, tol: float = BF16_HALF_SPACING,
                       n_singular: int = 8) -> dict:
    """Every statistic of the module docstring for one (m, n) matrix; k is capped at min(m, n)."""
    unchanged = (trained == base).double().mean().item()  # in the stored dtype: exact equality
    w, w2 = base.to(torch.float64), trained.to(torch.float64)
    delta = w2 - w
    k = min(k, *w.shape)
    norm, base_norm = delta.norm().item(), w.norm().item()
    below = (delta.abs() <= tol * w.abs()).double().mean().item()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u2, s2, vh2 = torch.linalg.svd(w2, full_matrices=False)
    rel = ((s2[:k] - s[:k]).abs() / s[:k].clamp_min(torch.finfo(torch.float64).tiny))
    left, right = principal_angles(u[:, :k], u2[:, :k]), principal_angles(vh[:k].T, vh2[:k].T)
    return {
        "shape": list(base.shape), "k": k,
        "update_norm": norm, "relative_update_norm": norm / base_norm if base_norm > 0 else None,
        "unchanged_share": unchanged, "below_tolerance_share": below,
        "top_singular_values_base": s[:n_singular].tolist(), "top_singular_values_trained": s2[:n_singular].tolist(),
        "spectral_drift": rel.max().item(),
        "max_left_angle_deg": math.degrees(left.max().item()), "max_right_angle_deg": math.degrees(right.max().item()),
        "off_principal_share": off_principal_share(delta, u[:, :k], vh[:k].T),
        "off_principal_share_isotropic": isotropic_off_principal_share(*w.shape, k),
    }


def isotropic_off_principal_share(m: int, n: int, k: int) -> float:
    """(1 − k/m)(1 − k/n): the expected off-principal share of an (m, n) update with i.i.d. entries, whatever the
    base (E‖AΔB‖²_F = σ²·tr(AᵀA)·tr(BBᵀ) for i.i.d. Δ, and tr(P⊥) = m − k, n − k)."""
    return (1.0 - k / m) * (1.0 - k / n)


def diagnose_states(base: dict[str, Tensor], trained: dict[str, Tensor], *, k: int = 16,
                    tol: float = BF16_HALF_SPACING, n_singular: int = 8) -> dict:
    """Per-matrix diagnostics of every 2-D floating tensor and totals over all floating tensors (a tensor stored
    under several names counted once). Mismatched names or shapes are a one-line error."""
    from tether.reference import check_same_tensors

    check_same_tensors([base, trained], ["base", "trained"])
    matrices, seen = {}, set()
    sq_delta = sq_base = n_entries = n_unchanged = n_below = 0.0
    for name, w in base.items():
        if not w.is_floating_point() or w.data_ptr() in seen:
            continue
        seen.add(w.data_ptr())
        w2 = trained[name]
        d = w2.to(torch.float64) - w.to(torch.float64)
        sq_delta += (d * d).sum().item()
        sq_base += w.to(torch.float64).pow(2).sum().item()
        n_entries += w.numel()
        n_unchanged += (w2 == w).sum().item()
        n_below += (d.abs() <= tol * w.to(torch.float64).abs()).sum().item()
        if w.dim() == 2:
            matrices[name] = matrix_diagnostics(w, w2, k=k, tol=tol, n_singular=n_singular)
    total = {"update_norm": math.sqrt(sq_delta), "relative_update_norm": math.sqrt(sq_delta / sq_base) if sq_base
             else None, "unchanged_share": n_unchanged / max(n_entries, 1), "below_tolerance_share":
             n_below / max(n_entries, 1), "entries": int(n_entries), "matrices": len(matrices)}
    return {"k": k, "tolerance": tol, "total": total, "matrices": matrices}


def plot(report: dict, path: Path) -> None:
    """Four panels over the matrices in the model's order (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["matrices"])
    rows = [report["matrices"][n] for n in names]
    x = list(range(len(names)))
    panels = [("relative_update_norm", "‖ΔW‖ / ‖W‖"),
              ("off_principal_share", f"update energy outside top-{report['k']}"),
              ("max_left_angle_deg", "largest principal angle (°, left)"), ("spectral_drift", "max |Δσ_i| / σ_i")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for ax, (key, label) in zip(axes.flat, panels):
        ax.plot(x, [float("nan") if r[key] is None else r[key] for r in rows], ".", ms=4)
        if key == "off_principal_share":  # what an update with no preferred direction would read
            ax.plot(x, [r["off_principal_share_isotropic"] for r in rows], "-", lw=0.8, color="gray",
                    label="isotropic update")
            ax.legend(fontsize=7)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("matrix (model order)")
    fig.suptitle(f"update diagnostics: {report.get('trained', 'trained')} vs {report.get('base', 'base')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg) -> dict:
    """``tether diagnose`` (``cfg`` is a ``tether.recipes.analysis_configs.DiagnoseConfig``): report and plot."""
    from tether.models import load_model

    report = diagnose_states(load_model(cfg.base).state_dict(), load_model(cfg.trained).state_dict(),
                             k=cfg.subspace_rank, tol=cfg.tolerance, n_singular=cfg.singular_values)
    report.update(base=cfg.base, trained=cfg.trained)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "diagnose.png")
    t = report["total"]
    changed = [m for m in report["matrices"].values() if m["off_principal_share"] is not None]
    shares = sorted(m["off_principal_share"] for m in changed)
    median = shares[len(shares) // 2] if shares else float("nan")
    iso = sorted(m["off_principal_share_isotropic"] for m in changed)
    iso_median = iso[len(iso) // 2] if iso else float("nan")
    print(f"{cfg.trained} vs {cfg.base}: ‖Δθ‖/‖θ‖ = {t['relative_update_norm']:.3g}, "
          f"unchanged {t['unchanged_share']:.1%}, below tolerance {t['below_tolerance_share']:.1%}; median update "
          f"share outside the top-{report['k']} subspace {median:.3f} over {len(shares)} changed matrices (an "
          f"isotropic update: {iso_median:.3f}); report and plot in {out}")
    return report
