"""Weight-space merging (``tether.merge``): SLERP's coefficients, LITI's endpoints, soups, refusals, and the
``tether merge`` command end to end on tiny models (safetensors in and out, KL to each input)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tether.cli import main
from tether.merge import liti, merge_states, slerp, slerp_coefficients
from tether.testing import assert_close, make_tiny_model_dir

F64 = torch.float64


def test_slerp_of_orthogonal_equal_norm_task_vectors_has_coefficients_root_half():
    """Ω = π/2, λ = ½: c = sin(π/4)/sin(π/2) = √½ each, so the merged task vector keeps the common norm (a linear
    average would give ½ each and norm √½·‖δ‖)."""
    d1 = torch.tensor([3.0, 0.0, 0.0, 4.0], dtype=F64)
    d2 = torch.tensor([0.0, 5.0, 0.0, 0.0], dtype=F64)
    c1, c2, omega = slerp_coefficients(d1, d2, 0.5)
    assert omega == pytest.approx(math.pi / 2, abs=1e-15)
    assert c1 == pytest.approx(math.sqrt(0.5), abs=1e-15) and c2 == pytest.approx(math.sqrt(0.5), abs=1e-15)
    assert (c1 * d1 + c2 * d2).norm().item() == pytest.approx(5.0, abs=1e-13)
    # the endpoints: λ = 0 is the first task vector, λ = 1 the second
    assert slerp_coefficients(d1, d2, 0.0)[:2] == pytest.approx((1.0, 0.0), abs=1e-15)
    assert slerp_coefficients(d1, d2, 1.0)[:2] == pytest.approx((0.0, 1.0), abs=1e-15)
    # Ω = π/3 at λ = ½: c = sin(π/6)/sin(π/3) = 1/√3 each
    e1, e2 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.5, math.sqrt(3) / 2], dtype=F64)
    assert slerp_coefficients(e1, e2, 0.5)[:2] == pytest.approx((1 / math.sqrt(3),) * 2, abs=1e-12)
    # parallel or zero task vectors: the linear limit, flagged by Ω = nan
    c1, c2, omega = slerp_coefficients(d1, 2 * d1, 0.25)
    assert (c1, c2) == (0.75, 0.25) and math.isnan(omega)
    assert math.isnan(slerp_coefficients(d1, torch.zeros(4, dtype=F64), 0.5)[2])


def test_slerp_of_state_dicts_is_tensor_by_tensor_relative_to_the_base():
    base = {"w": torch.ones(2, 2, dtype=F64), "b": torch.zeros(3, dtype=F64), "n": torch.tensor(3)}
    first = {"w": base["w"] + torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64), "b": torch.ones(3, dtype=F64),
             "n": torch.tensor(3)}
    second = {"w": base["w"] + torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64), "b": 3 * torch.ones(3, dtype=F64),
              "n": torch.tensor(3)}
    merged, report = slerp(base, first, second, 0.5)
    r = math.sqrt(0.5)
    assert_close(merged["w"], base["w"] + torch.tensor([[r, r], [0.0, 0.0]], dtype=F64), "w", atol=1e-15)
    assert_close(merged["b"], 2 * torch.ones(3, dtype=F64), "b (parallel: linear)", atol=1e-15)
    assert report["linear_fallback_tensors"] == 1 and torch.equal(merged["n"], base["n"])


def test_liti_hits_its_endpoints_and_interpolates_linearly():
    torch.manual_seed(0)
    init = {"w": torch.randn(4, 3), "n": torch.tensor(1)}
    merged = {"w": torch.randn(4, 3), "n": torch.tensor(1)}
    assert torch.equal(liti(init, merged, 0.0)["w"], init["w"])
    assert torch.equal(liti(init, merged, 1.0)["w"], merged["w"])
    assert_close(liti(init, merged, 0.3)["w"], 0.7 * init["w"] + 0.3 * merged["w"], "η = 0.3", atol=1e-6)


def test_merge_states_refuses_mismatched_models_and_bad_arguments():
    a = {"w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"'w' is \(3, 2\) in B but \(2, 3\) in A"):
        merge_states("soup", [a, {"w": torch.zeros(3, 2)}], ["A", "B"])
    with pytest.raises(ValueError, match="differ in tensors"):
        merge_states("soup", [a, {"v": torch.zeros(2, 3)}], ["A", "B"])
    with pytest.raises(ValueError, match="exactly 2 models"):
        merge_states("slerp", [a, a, a], ["A", "B", "C"], base=a)
    with pytest.raises(ValueError, match="set base"):
        merge_states("soup", [a, a], ["A", "B"], eta=0.5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in ("hi", "yes", "cat")))
    return {f"m{s}": str(make_tiny_model_dir(root / f"m{s}", seed=s)) for s in range(3)} | {"prompts": str(prompts)}


def test_merge_command_writes_safetensors_and_the_kl_to_each_input(models, tmp_path, capsys):
    """A uniform soup of m1 and m2 through the CLI: model.safetensors holds exactly (θ1 + θ2)/2 (float64 average
    rounded to fp32), the report has KL(merged ‖ m1), KL(merged ‖ m2) and KL(merged ‖ base m0), all positive for
    three different random models; a soup of m0 with itself measured against m0 is KL 0 exactly."""
    out = tmp_path / "soup"
    assert main(["merge", "--models", models["m1"], models["m2"], "--base", models["m0"], "--output_dir", str(out),
                 "--prompts_file", models["prompts"], "--kl_samples_per_prompt", "2", "--kl_max_new_tokens", "4"]) == 0
    merged = load_file(out / "model.safetensors")
    w1, w2 = load_file(f"{models['m1']}/model.safetensors"), load_file(f"{models['m2']}/model.safetensors")
    for name, value in merged.items():
        expected = ((w1[name].double() + w2[name].double()) / 2).float()
        assert torch.equal(value, expected), name
    report = json.loads((out / "merge_report.json").read_text())
    assert set(report["kl_to"]) == {models["m1"], models["m2"], "base:" + models["m0"]}
    assert all(r["token_kl"]["mean"] > 0 for r in report["kl_to"].values())
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    same = tmp_path / "same"
    assert main(["merge", "--models", models["m0"], models["m0"], "--output_dir", str(same), "--prompts_file",
                 models["prompts"], "--kl_samples_per_prompt", "1", "--kl_max_new_tokens", "4"]) == 0
    kl = json.loads((same / "merge_report.json").read_text())["kl_to"][models["m0"]]
    assert kl["token_kl"]["mean"] == 0.0


def test_merge_command_slerp_with_liti_and_one_line_errors(models, tmp_path, capsys):
    """SLERP at λ = ½ then LITI η = 0 is the base exactly; refusals are one line on stderr, exit code 2."""
    out = tmp_path / "liti0"
    assert main(["merge", "--method", "slerp", "--models", models["m1"], models["m2"], "--base", models["m0"],
                 "--eta", "0", "--output_dir", str(out)]) == 0
    merged, base = load_file(out / "model.safetensors"), load_file(f"{models['m0']}/model.safetensors")
    assert all(torch.equal(merged[k], base[k]) for k in base)
    capsys.readouterr()
    assert main(["merge", "--method", "slerp", "--models", models["m1"], "--base", models["m0"],
                 "--output_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tether merge: error:") and "two" in err and "\n" not in err
