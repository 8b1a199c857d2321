"""Q-probe (``tether.inference.qprobe``): recovery of a known linear reward on synthetic embeddings, the base law at
k = 1 and τ = ∞, and the features it reads from a real (tiny) model."""

import math

import torch
from inference_helpers import REF, TEXTS, CharTokenizer, TableLM, count_b_reward

from tether.inference import METHODS, QProbe, completion_features, draw_candidates, laws
from tether.inference.qprobe import fit_qprobe_preferences, fit_qprobe_rewards, qprobe_select
from tether.logprobs import hidden_states
from tether.sampling import sample
from tether.testing import assert_close, tiny_model, tiny_tokenizer


def synthetic(n: int, d: int, seed: int):
    """Features with per-dimension shifts and scales (so standardization matters) and a known weight vector."""
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randn(d, generator=gen, dtype=torch.float64) * 3
    scale = torch.rand(d, generator=gen, dtype=torch.float64) * 4 + 0.5
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale + shift
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    return x, w, gen


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_recovers_a_linear_reward_from_rewards():
    """Noiseless r = xᵀw* + 1.5: ridge with λ → 0 gives back r at every point (to 1e-8) and w* in the original
    coordinates (the probe's weight divided by the feature scale)."""
    x, w, _ = synthetic(300, 6, 0)
    r = x @ w + 1.5
    probe = fit_qprobe_rewards(x, r, l2=1e-12)
    with torch.no_grad():
        assert_close(probe(x), r, "Q(x)", atol=1e-8)
        assert_close(probe.linear.weight[0] / probe.scale, w, "w*", atol=1e-8)


def test_recovers_a_linear_reward_from_preferences():
    """Pairs (x₁, x₂) with P(x₁ preferred) = σ(w*ᵀ(x₁ − x₂)), n = 4000, d = 5: the Bradley–Terry fit points along
    w* (in original coordinates). Here the logits have std ≈ 2.8, E[σ′] ≈ 0.12 and standardized differences have
    variance 2 per dimension, so the Fisher information is ≈ 0.24 per pair and direction: a standard error of
    1/√(4000·0.24) ≈ 0.032 per coordinate against ‖w*‖ ≈ 2 (standardized), an angle of order √(d−1)·0.032/2 ≈ 0.03
    rad (this seed: 0.06). We ask cos ≥ 0.99, i.e. 0.14 rad."""
    x1, w, gen = synthetic(4000, 5, 1)
    x2 = torch.randn(4000, 5, generator=gen, dtype=torch.float64) * x1.std(0) + x1.mean(0)
    w = w / (x1.std(0) * 1.5)  # logits of order one
    first = torch.rand(4000, generator=gen, dtype=torch.float64) < torch.sigmoid((x1 - x2) @ w)
    chosen = torch.where(first[:, None], x1, x2)
    rejected = torch.where(first[:, None], x2, x1)
    probe = fit_qprobe_preferences(chosen, rejected, l2=0.0)
    with torch.no_grad():
        assert cosine(probe.linear.weight[0] / probe.scale, w) >= 0.99
        assert float(probe.linear.bias) == 0.0


def test_k1_and_infinite_temperature_give_the_base_law():
    """Exactly: with one candidate the kept one is the draw itself, and at τ = ∞ every candidate is kept with
    probability 1/k — so the output law is π_ref for any Q. τ = 0 keeps the argmax."""
    q = torch.tensor([0.3, -1.0, 2.0, 0.7] * 4, dtype=torch.float64)[: len(REF)]
    assert_close(laws.soft_best_of_n_law(REF, q, 1, 0.1), REF, "k = 1", atol=1e-15)
    assert_close(laws.soft_best_of_n_law(REF, q, 4, math.inf), REF, "τ = ∞", atol=1e-15)
    values = torch.tensor([[0.1, 0.5, -0.2], [1.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(qprobe_select(values, math.inf).probs, torch.full((2, 3), 1 / 3, dtype=torch.float64))
    assert torch.equal(qprobe_select(values[:, :1], 0.5).index, torch.zeros(2, dtype=torch.long))
    assert torch.equal(qprobe_select(values, 0.0).probs, torch.tensor([[0, 1, 0], [0.5, 0.5, 0]],
                                                                        dtype=torch.float64))


def test_qprobe_method_with_k1_keeps_the_plain_sample():
    """On sampled candidates: Q-probe at k = 1 returns candidate 0 — the same completions as plain sampling."""
    cands = draw_candidates(TableLM(), CharTokenizer(), [{"prompt": "a"}] * 40, count_b_reward, n=4, base_samples=1,
                            max_new_tokens=3, seed=0, batch_size=512)
    q = torch.randn(40, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = METHODS["qprobe"](cands, 1, q=q, tau=0.1)
    plain = METHODS["plain"](cands)
    assert res.kept(cands) == plain.kept(cands)
    assert set(cands.done.texts) <= set(TEXTS)


def test_completion_features_are_the_last_token_state_of_each_sequence(tmp_path):
    """Batched, padded features equal an unpadded forward of each prompt + completion alone (fp32, 1e-5);
    a probe survives save and load."""
    model, tok = tiny_model(seed=0), tiny_tokenizer()
    prompts = [tok("hi there", add_special_tokens=False)["input_ids"], tok("a", add_special_tokens=False)["input_ids"]]
    done = sample(model, tok, prompts, n=3, max_new_tokens=6, seed=0)
    feats = completion_features(model, done, tok.pad_token_id, batch_size=4)
    assert feats.shape == (6, model.config.hidden_size)
    for k in range(6):
        ids = torch.tensor([done.prompt_ids[k] + done.completion_ids[k]])
        with torch.no_grad():
            h = hidden_states(model, ids, torch.ones_like(ids))[0, -1]
        assert_close(feats[k], h, f"row {k}", atol=1e-5)
    probe = fit_qprobe_rewards(feats, torch.arange(6.0), l2=1e-2)
    probe.save(tmp_path / "q.pt")
    again = QProbe.load(tmp_path / "q.pt")
    with torch.no_grad():
        assert torch.equal(again(feats), probe(feats))
