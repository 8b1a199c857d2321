"""Update diagnostics (``tether.diagnose``) against planted updates with known answers, and ``tether diagnose`` end
to end on tiny models (JSON report and plot)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tether.cli import main
from tether.diagnose import (
    diagnose_states,
    isotropic_off_principal_share,
    matrix_diagnostics,
    off_principal_share,
    principal_angles,
)
from tether.testing import make_tiny_model_dir

F64 = torch.float64


def _planted(seed: int = 0, m: int = 12, n: int = 9, k: int = 3):
    """A base W = U diag(s) Vᵀ with distinct singular values and its top-k / remaining singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    s = torch.linspace(10.0, 1.0, n, dtype=F64)
    w = u[:, :n] @ torch.diag(s) @ v.T
    return w, u[:, :k], v[:, :k], u[:, k:], v[:, k:]


def test_identical_models_give_zero_drift():
    w, *_ = _planted()
    d = matrix_diagnostics(w, w.clone(), k=3)
    assert d["update_norm"] == 0.0 and d["relative_update_norm"] == 0.0
    assert d["unchanged_share"] == 1.0 and d["below_tolerance_share"] == 1.0
    assert d["spectral_drift"] == 0.0 and d["off_principal_share"] is None
    assert d["max_left_angle_deg"] < 1e-5 and d["max_right_angle_deg"] < 1e-5  # arccos near 1: √(2·1e-16) rad
    report = diagnose_states({"w": w, "b": torch.ones(3)}, {"w": w.clone(), "b": torch.ones(3)}, k=3)
    assert report["total"]["update_norm"] == 0.0 and report["total"]["unchanged_share"] == 1.0


def test_planted_update_inside_the_top_k_subspace_has_share_zero_and_outside_share_one():
    """ΔW = U_k A V_kᵀ lies in the base's principal subspace: (I − P_U) ΔW = 0, share 0. ΔW = U_⊥ B V_⊥ᵀ touches
    neither principal space: share 1. A sum of the two with energies 1 and 3 reads 3/4 (the blocks are orthogonal)."""
    w, uk, vk, uo, vo = _planted()
    g = torch.Generator().manual_seed(1)
    inside = uk @ torch.randn(3, 3, generator=g, dtype=F64) @ vk.T
    outside = uo[:, :4] @ torch.randn(4, 4, generator=g, dtype=F64) @ vo[:, :4].T
    assert off_principal_share(inside, uk, vk) == pytest.approx(0.0, abs=1e-28)
    assert off_principal_share(outside, uk, vk) == pytest.approx(1.0, abs=1e-14)
    mixed = inside / inside.norm() + math.sqrt(3) * outside / outside.norm()
    assert off_principal_share(mixed, uk, vk) == pytest.approx(0.75, abs=1e-14)
    # through the full diagnostics (the base's own SVD finds U_k, V_k up to signs)
    assert matrix_diagnostics(w, w + 1e-3 * inside, k=3)["off_principal_share"] == pytest.approx(0.0, abs=1e-12)
    assert matrix_diagnostics(w, w + 1e-3 * outside, k=3)["off_principal_share"] == pytest.approx(1.0, abs=1e-12)


def test_isotropic_share_is_the_average_over_an_orthonormal_basis_of_updates():
    """Σ_ij ‖P_U⊥ E_ij P_V⊥‖² over the m·n unit matrices E_ij is tr(P_U⊥)·tr(P_V⊥) = (m − k)(n − k) exactly, so the
    mean share over that basis (each ‖E_ij‖ = 1) is (1 − k/m)(1 − k/n), for any base."""
    w, uk, vk, *_ = _planted()
    m, n = w.shape
    total = 0.0
    for i in range(m):
        for j in range(n):
            e = torch.zeros(m, n, dtype=F64)
            e[i, j] = 1.0
            total += off_principal_share(e, uk, vk)
    assert total / (m * n) == pytest.approx(isotropic_off_principal_share(m, n, 3), abs=1e-13)
    assert isotropic_off_principal_share(576, 1536, 16) == 560 * 1520 / (576 * 1536)  # 0.96209


def test_spectral_drift_and_subspace_angles_of_a_planted_change():
    """Scaling σ_1 by 1.1 (same singular vectors) is a spectral drift of exactly 0.1 with no rotation; rotating the
    top left singular vector by 30° towards a direction outside W's column space (so W stays an exact SVD with the
    new vector) gives a largest left principal angle of 30° and leaves the right subspace (and every σ) in place."""
    w, uk, vk, uo, vo = _planted()
    s1 = torch.linalg.svdvals(w)[0]
    scaled = w + 0.1 * s1 * uk[:, :1] @ vk[:, :1].T
    d = matrix_diagnostics(w, scaled, k=3)
    assert d["spectral_drift"] == pytest.approx(0.1, abs=1e-12)
    assert d["max_left_angle_deg"] < 1e-5 and d["max_right_angle_deg"] < 1e-5
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    new_u1 = c * uk[:, :1] + s * uo[:, -1:]  # u_12: W (12 × 9) has rank 9 and does not use u_10..u_12
    rotated = w + s1 * (new_u1 - uk[:, :1]) @ vk[:, :1].T
    d = matrix_diagnostics(w, rotated, k=3)
    assert d["max_left_angle_deg"] == pytest.approx(30.0, abs=1e-9)
    assert d["max_right_angle_deg"] < 1e-5 and d["spectral_drift"] == pytest.approx(0.0, abs=1e-12)
    assert principal_angles(uk, uk).abs().max().item() < 1e-7
    # ascending, as documented: a 2-D span against one sharing its first direction and tilted 60° in the second
    e = torch.eye(4, dtype=torch.float64)
    tilted = torch.stack([e[0], math.cos(math.pi / 3) * e[1] + math.sin(math.pi / 3) * e[2]], dim=1)
    angles = principal_angles(e[:, :2], tilted)
    assert angles.tolist() == pytest.approx([0.0, math.pi / 3], abs=1e-7)


def test_sparsity_counts_exactly_unchanged_and_below_tolerance_entries():
    base = torch.ones(4, 5)
    trained = base.clone()
    trained[0, 0] = 1.0 + 2.0 ** -12  # below the relative tolerance 2^-9 (changed, but a bf16 copy would not see it)
    trained[1, 1] = 1.5               # a real change
    d = matrix_diagnostics(base, trained, k=2)
    assert d["unchanged_share"] == 18 / 20 and d["below_tolerance_share"] == 19 / 20


def test_diagnose_command_writes_report_and_plot(tmp_path, capsys):
    a, b = make_tiny_model_dir(tmp_path / "a", seed=0), make_tiny_model_dir(tmp_path / "b", seed=1)
    out = tmp_path / "diag"
    assert main(["diagnose", "--base", str(a), "--trained", str(b), "--output_dir", str(out),
                 "--subspace_rank", "4"]) == 0
    report = json.loads((out / "diagnose.json").read_text())
    assert report["k"] == 4 and report["matrices"] and report["total"]["unchanged_share"] < 0.5
    assert all(0.0 <= m["off_principal_share"] <= 1.0 for m in report["matrices"].values())
    assert (out / "diagnose.png").stat().st_size > 1000
    assert main(["diagnose", "--base", str(a), "--trained", str(a), "--output_dir", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "diagnose.json").read_text())
    assert same["total"]["update_norm"] == 0.0
    assert all(m["spectral_drift"] == 0.0 for m in same["matrices"].values())
