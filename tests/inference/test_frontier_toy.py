"""`tether frontier` on the enumerable toy of ``inference_helpers`` (fixed-logits model, 15 outcomes, reward = the
number of 'b's: four levels with ties): the inference-time points lie on their closed-form laws and none lies above
the tilted optimum.

Closed forms (``tether.inference.laws``, exact by enumeration in float64): best-of-N keeps the law
π_N = π_ref/m·(F^N − F⁻^N); tilted resampling over N candidates keeps soft best-of-N's law at τ = β (not π*: it
reaches π* only as N → ∞). A point's reward is the mean kept reward over P prompts (95% CI over prompts); its KL is
the reward-level plug-in on each prompt's K = N + M reference draws (95% CI over prompts). That CI is over prompts
only: the plug-in's own bias, O(1/K) per prompt, is not in it, while its standard error falls as 1/√(P·K) — at
P = 400, K = 204 the bias of best-of-8's figure (−0.004 nats) is five standard errors. Hence P = 60, K = 1000 here:
bias below one standard error. "On the curve" is checked as "the exact value lies in the reported CI widened to 4
standard errors" (about 1 in 16,000 per check by chance; fixed seeds, so the test is deterministic); KL values
that are 0 up to float64 rounding get an absolute 1e-12.

The tilted optimum: π*_β ∝ π_ref·exp(r/β) maximizes E[r] − β·KL, so at any KL budget k no law has a higher
expected reward than R*(k) = E_{π*_β(k)}[r] with KL(π*_β(k) ‖ π_ref) = k. Checked exactly for every closed-form law of
the sweep (E[r] ≤ R*(KL) + 1e-9), and for every measured point: the bottom of its reward CI is ≤ R* at the top of
its KL CI (a point whose whole CI box lies above the curve fails)."""

import json
import math

import torch
from inference_helpers import REF, CharTokenizer, TableLM, count_b_reward, rewards_of

from tether.inference import laws
from tether.recipes.analysis_configs import FrontierConfig
from tether.recipes.frontier import run

P, M = 60, 992
LEVEL_R = rewards_of(count_b_reward)
WIDEN = 4 / 1.96


def optimum_reward_at(kl: float) -> float:
    """R*(k): E_{π*_β}[r] at the β where KL(π*_β ‖ π_ref) = k (bisection on log β; the KL falls as β grows)."""
    top = float(laws.kl(laws.tilted_law(REF, LEVEL_R, 1e-6)[0], REF))
    if kl >= top:
        return float(LEVEL_R.max())
    lo, hi = math.log(1e-6), math.log(1e6)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if laws.kl(laws.tilted_law(REF, LEVEL_R, math.exp(mid))[0], REF) > kl:
            lo = mid
        else:
            hi = mid
    star, _ = laws.tilted_law(REF, LEVEL_R, math.exp(hi))
    return float((star * LEVEL_R).sum())


def closed_form(point: dict) -> torch.Tensor:
    n = point["params"]["n"]
    if point["method"] == "best_of_n":
        return laws.best_of_n_law(REF, LEVEL_R, n)
    return laws.soft_best_of_n_law(REF, LEVEL_R, n, point["params"]["beta"])


def widened(ci: list[float], mean: float) -> tuple[float, float]:
    return mean - WIDEN * (mean - ci[0]) - 1e-12, mean + WIDEN * (ci[1] - mean) + 1e-12


def test_best_of_n_and_tilted_points_lie_on_their_closed_forms_and_below_the_tilted_optimum(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "a", "id": i}) + "\n" for i in range(P)))
    cfg = FrontierConfig(model="toy", prompts_file=str(prompts), output_dir=str(tmp_path / "out"),
                         max_new_tokens=3, best_of_n=[1, 2, 4, 8], tilted_beta=[0.5, 2.0], tilted_n=8,
                         base_samples=M, batch_size=8192, progress=False)
    report = run(cfg, model=TableLM(), tokenizer=CharTokenizer(), reward=count_b_reward, use_chat_template=False)
    points = report["points"]
    assert [p["method"] for p in points] == ["best_of_n"] * 4 + ["tilted"] * 2

    for p in points:
        law = closed_form(p)
        exact_kl, exact_reward = laws.kl(law, REF), float((law * LEVEL_R).sum())
        kl, reward = p["sequence_kl"], p["reward"]
        assert kl["figure"] == "reward_level_plugin" and kl["kind"] == "plug-in", kl
        assert reward["n"] == P
        lo, hi = widened(kl["ci95"], kl["mean"])
        assert lo <= exact_kl <= hi, (p["label"], exact_kl, kl)
        lo, hi = widened(reward["ci95"], reward["mean"])
        assert lo <= exact_reward <= hi, (p["label"], exact_reward, reward)
        # The closed-form law itself is below the tilted optimum at its own KL (exactly, up to float64 noise) …
        assert exact_reward <= optimum_reward_at(exact_kl) + 1e-9, (p["label"], exact_kl, exact_reward)
        # … and no measured point's CI box lies wholly above it.
        assert reward["ci95"][0] <= optimum_reward_at(kl["ci95"][1]), p

    # Best-of-1 is π_ref: KL 0 on every prompt's levels (up to float64 rounding in the log-ratios).
    assert abs(points[0]["sequence_kl"]["mean"]) < 1e-12

    # The analytic best-of-N curve: x = log N − (N−1)/N; with ties the exact KL on the levels is below it.
    for c in report["curves"]["best_of_n"]:
        assert c["kl"] == laws.bon_kl_bound(c["n"])
        assert c["kl_on_levels"] <= c["kl"] + 1e-12
    # The drawn tilted-optimum curve (plug-in on P·(8 + M) draws) is close to the exact one.
    for c in report["curves"]["tilted_optimum"]:
        star, _ = laws.tilted_law(REF, LEVEL_R, c["beta"])
        assert abs(c["reward"] - float((star * LEVEL_R).sum())) < 0.01, c
        assert abs(c["kl"] - laws.kl(star, REF)) < 0.01, c
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 1000
