"""The sparse-support and reference-certainty statistics of ``token_stats`` against their plain twins.

``topk_ids`` / ``topk_logps`` / ``topk_rest`` (the rollout policy's top-K support, TROLL's scoring pass),
``support_logps`` / ``support_rest`` (the policy on that support, TROLL's update pass, differentiable) and
``ref_max_logp`` (the critical-token KL's certainty): chunked vs full logits, forward and backward at fp32 atol 1e-5,
with odd shapes (3 × 47 positions, hidden 31, vocabulary 123), chunk sizes that do not divide the positions, a fully
masked row and an upstream gradient that is not 1 (tolerance: atol 1e-5 + rtol 1e-5).
"""

import math

import pytest
import torch

from tether.logprobs import IGNORE_INDEX, token_stats, token_stats_plain

B, T, H, V, K = 3, 47, 31, 123, 7


def _report(name, a, b, atol, rtol=1e-5):
    """|a − b| ≤ atol + rtol·|b| elementwise (the weight gradient sums ~100 positions × 10 statistics, entries ~10:
    float32 summation order alone moves them by ~1e-6 relative)."""
    bad = (a - b).abs() > atol + rtol * b.abs()
    if bad.any():
        idx = bad.nonzero()[:10].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} mismatches, first at {idx}: {a[bad][:5]} vs {b[bad][:5]}")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_(True)
    bias = (torch.randn(V, generator=g) * 0.1).requires_grad_(True)
    old_hidden = torch.randn(B, T, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :10] = IGNORE_INDEX
    labels[1, :] = IGNORE_INDEX
    labels[2, 40:] = IGNORE_INDEX
    return hidden, weight, bias, old_hidden, labels, g


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_topk_matches_plain_and_is_the_top_of_the_distribution(chunk_size, temperature):
    """The top-K ids and log-probs are those of the full distribution (most probable first); the rest log-mass
    equals log(1 − Σ_topK p), computed here in float64 from the full softmax."""
    hidden, weight, bias, _, labels, _ = _inputs()
    stats = ("topk_ids", "topk_logps", "topk_rest")
    with torch.no_grad():
        chunked = token_stats(hidden, weight, labels, bias=bias, stats=stats, top_k=K, chunk_size=chunk_size,
                              temperature=temperature)
        logits = hidden @ weight.T + bias
        plain = token_stats_plain(logits, labels, stats=stats, top_k=K, temperature=temperature)
    assert chunked["topk_ids"].shape == (B, T, K) and chunked["topk_ids"].dtype == torch.long
    assert torch.equal(chunked["topk_ids"], plain["topk_ids"])
    _report("topk_logps", chunked["topk_logps"], plain["topk_logps"], 1e-5)
    _report("topk_rest", chunked["topk_rest"], plain["topk_rest"], 1e-5)
    valid = labels != IGNORE_INDEX
    logp64 = torch.log_softmax(logits.double() / temperature, -1)
    top = logp64.topk(K, -1)
    assert torch.equal(chunked["topk_ids"][valid], top.indices[valid])
    rest64 = torch.log1p(-top.values.exp().sum(-1))
    _report("topk_rest vs float64", chunked["topk_rest"][valid].double(), rest64[valid], 1e-5)
    assert (chunked["topk_ids"][~valid] == 0).all() and (chunked["topk_rest"][~valid] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_support_stats_match_plain_forward_and_backward(chunk_size, temperature):
    """log π at given ids and the log-mass off them, with the sampled token's log-prob and the entropy in the same
    loss (so the generic backward runs), each weighted by its own upstream gradient."""
    hidden, weight, bias, old_hidden, labels, g = _inputs(1)
    with torch.no_grad():  # the old policy's support, as TROLL's scoring pass stores it
        ids = token_stats(old_hidden, weight.detach(), labels, stats=("topk_ids",), top_k=K)["topk_ids"]
    stats = ("logps", "support_logps", "support_rest", "entropy")
    upstream = {"logps": torch.randn(B, T, generator=g), "support_logps": torch.randn(B, T, K, generator=g),
                "support_rest": torch.randn(B, T, generator=g), "entropy": torch.randn(B, T, generator=g)}

    chunked = token_stats(hidden, weight, labels, bias=bias, stats=stats, support_ids=ids, chunk_size=chunk_size,
                          temperature=temperature)
    loss_c = sum((chunked[s] * upstream[s]).sum() for s in stats)
    grads_c = torch.autograd.grad(loss_c, (hidden, weight, bias))

    plain = token_stats_plain(hidden @ weight.T + bias, labels, stats=stats, support_ids=ids, temperature=temperature)
    loss_p = sum((plain[s] * upstream[s]).sum() for s in stats)
    grads_p = torch.autograd.grad(loss_p, (hidden, weight, bias))

    for s in stats:
        _report(s, chunked[s], plain[s], 1e-5)
    for name, gc, gp in zip(("hidden", "weight", "bias"), grads_c, grads_p):
        _report(f"grad {name}", gc, gp, 1e-5)
    assert grads_c[0][1].abs().max() == 0  # fully masked row


def test_support_and_rest_partition_the_distribution():
    """Σ_support π + exp(rest) = 1 at every labelled position, and the rest alone carries a gradient."""
    hidden, weight, bias, old_hidden, labels, g = _inputs(2)
    ids = (torch.randint(0, V, (B, T, 1), generator=g) + torch.arange(K) * 13) % V  # distinct ids per position
    out = token_stats(hidden, weight, labels, bias=bias, stats=("support_logps", "support_rest"), support_ids=ids,
                      chunk_size=9)
    valid = labels != IGNORE_INDEX
    total = out["support_logps"].exp().sum(-1) + out["support_rest"].exp()
    _report("mass", total[valid], torch.ones_like(total[valid]), 1e-5)
    (grad,) = torch.autograd.grad(out["support_rest"].sum(), hidden)
    assert grad[valid].abs().max() > 0


@pytest.mark.parametrize("chunk_size", [5, 1000])
def test_ref_max_logp_matches_plain_and_hand_values(chunk_size):
    """Chunked = plain; and by hand: a reference with equal logits has max log-prob −log V at any temperature,
    and raising T' flattens the distribution (the max log-prob falls towards −log V)."""
    hidden, weight, _, old_hidden, labels, _ = _inputs(3)
    ref_weight = torch.randn(V, H) * 0.3
    kw = dict(ref_hidden=old_hidden, ref_weight=ref_weight, stats=("logps", "ref_max_logp"), temperature=0.7)
    out = {}
    for t_prime in (1.0, 4.0):
        chunked = token_stats(hidden, weight, labels, chunk_size=chunk_size, ref_max_temperature=t_prime, **kw)
        plain = token_stats_plain(hidden @ weight.T, labels, ref_logits=old_hidden @ ref_weight.T,
                                  stats=kw["stats"], temperature=0.7, ref_max_temperature=t_prime)
        _report(f"ref_max_logp T'={t_prime}", chunked["ref_max_logp"], plain["ref_max_logp"], 1e-5)
        assert not chunked["ref_max_logp"].requires_grad
        ref64 = torch.log_softmax((old_hidden @ ref_weight.T).double() / t_prime, -1).amax(-1)
        valid = labels != IGNORE_INDEX
        _report("vs float64", chunked["ref_max_logp"][valid].double(), ref64[valid], 1e-5)
        out[t_prime] = chunked["ref_max_logp"][valid]
    assert (out[4.0] < out[1.0]).all() and (out[4.0] >= -math.log(V) - 1e-6).all()
    flat = token_stats(hidden, weight, labels, ref_hidden=old_hidden, ref_weight=torch.zeros(V, H),
                       stats=("ref_max_logp",), ref_max_temperature=4.0)["ref_max_logp"]
    _report("uniform reference", flat[labels != IGNORE_INDEX],
            torch.full_like(flat[labels != IGNORE_INDEX], -math.log(V)), 1e-5)


def test_support_statistics_errors_name_what_is_missing():
    hidden, weight, _, _, labels, _ = _inputs()
    with pytest.raises(ValueError, match="top_k"):
        token_stats(hidden, weight, labels, stats=("topk_ids",))
    with pytest.raises(ValueError, match="top_k"):
        token_stats(hidden, weight, labels, stats=("topk_rest",), top_k=V)
    with pytest.raises(ValueError, match="support_ids"):
        token_stats(hidden, weight, labels, stats=("support_rest",))


def test_no_labels_gives_shaped_zeros():
    hidden, weight, _, _, labels, _ = _inputs()
    none = torch.full_like(labels, IGNORE_INDEX)
    out = token_stats(hidden, weight, none, stats=("topk_ids", "topk_logps", "topk_rest"), top_k=K)
    assert out["topk_ids"].shape == (B, T, K) and out["topk_ids"].dtype == torch.long
    assert out["topk_logps"].shape == (B, T, K) and out["topk_rest"].shape == (B, T)
