"""Chunked per-token statistics against the plain full-logits twin: forward and backward, fp32 atol 1e-5.

Odd shapes (3 × 47 positions, hidden 31, vocab 123), chunk sizes that do not divide the number of positions,
fully masked rows, an upstream gradient that is not 1, and -inf-free but peaked logits.
"""

import pytest
import torch

from tether.logprobs import IGNORE_INDEX, STATS, hidden_states, lm_head, token_stats, token_stats_plain
from tether.testing import tiny_model

B, T, H, V = 3, 47, 31, 123


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_(True)
    bias = (torch.randn(V, generator=g) * 0.1).requires_grad_(True)
    ref_hidden = torch.randn(B, T, H, generator=g)
    ref_weight = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :10] = IGNORE_INDEX  # a prompt
    labels[1, :] = IGNORE_INDEX  # a fully masked row
    labels[2, 40:] = IGNORE_INDEX  # padding
    upstream = {s: torch.randn(B, T, generator=g) for s in STATS}
    return hidden, weight, bias, ref_hidden, ref_weight, labels, upstream


def _report(name, a, b, atol):
    bad = (a - b).abs() > atol
    if bad.any():
        idx = bad.nonzero()[:10].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} mismatches, first at {idx}: {a[bad][:5]} vs {b[bad][:5]}")


# (computed statistics, statistics the loss uses): every statistic with a gradient; the log-probs alone (the
# backward's closed-form path); log-probs in the loss with an exact KL that is only logged (no gradient).
STAT_CASES = {"all": (STATS, STATS), "logps": (("logps",), ("logps",)),
              "logps_logged_kl": (("logps", "kl"), ("logps",))}


@pytest.mark.parametrize("case", sorted(STAT_CASES))
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_plain_forward_and_backward(chunk_size, temperature, case):
    hidden, weight, bias, ref_hidden, ref_weight, labels, upstream = _inputs()
    stats, used = STAT_CASES[case]

    chunked = token_stats(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          stats=stats, chunk_size=chunk_size, temperature=temperature)
    loss_c = sum((chunked[s] * upstream[s]).sum() for s in used)
    grads_c = torch.autograd.grad(loss_c, (hidden, weight, bias))

    logits = hidden @ weight.T + bias
    ref_logits = ref_hidden @ ref_weight.T
    plain = token_stats_plain(logits, labels, ref_logits=ref_logits, stats=stats, temperature=temperature)
    loss_p = sum((plain[s] * upstream[s]).sum() for s in used)
    grads_p = torch.autograd.grad(loss_p, (hidden, weight, bias))

    for s in stats:
        _report(s, chunked[s], plain[s], 1e-5)
        assert (chunked[s][labels == IGNORE_INDEX] == 0).all()
    for name, gc, gp in zip(("hidden", "weight", "bias"), grads_c, grads_p):
        _report(f"grad {name}", gc, gp, 1e-5)
    assert grads_c[0][1].abs().max() == 0  # fully masked row receives no gradient


def test_identity_reference_gives_zero_kl_and_risk():
    hidden, weight, _, _, _, labels, _ = _inputs(1)
    out = token_stats(hidden, weight, labels, ref_hidden=hidden, ref_weight=weight,
                      stats=("kl", "forward_kl", "risk", "logps", "ref_logps"), chunk_size=16)
    for s in ("kl", "forward_kl", "risk"):
        assert out[s].abs().max() < 1e-6, s
    assert torch.allclose(out["logps"], out["ref_logps"])


def test_risk_matches_hand_worked_case():
    """Spec §5 (b): π_ref = [0.4, 0.3, 0.2, 0.1], π uniform ⇒ R = 0.242698 at c = 0.5 and 0.198069 at c = 0.95."""
    ref_logits = torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]).log()
    logits = torch.zeros(1, 1, 4)
    labels = torch.zeros(1, 1, dtype=torch.long)
    for c, expected in ((0.5, 0.242698), (0.95, 0.198069)):
        out = token_stats_plain(logits, labels, ref_logits=ref_logits, stats=("risk",), risk_confidence=c)
        assert out["risk"].item() == pytest.approx(expected, abs=1e-6)


def test_missing_reference_is_a_clear_error():
    hidden, weight, _, _, _, labels, _ = _inputs()
    with pytest.raises(ValueError, match="reference"):
        token_stats(hidden, weight, labels, stats=("kl",))
    with pytest.raises(ValueError, match="unknown"):
        token_stats(hidden, weight, labels, stats=("perplexity",))


def test_model_glue_matches_hf_logits():
    """hidden_states × lm_head reproduces the model's own logits, so log-probs equal log_softmax(model(x).logits)."""
    model = tiny_model(seed=3)
    ids = torch.randint(0, 259, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3:12] = ids[:, 4:13]
    labels[1, 9:] = IGNORE_INDEX
    weight, bias = lm_head(model)
    chunked = token_stats(hidden_states(model, ids, mask), weight, labels, bias=bias, chunk_size=5)["logps"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    plain = token_stats_plain(logits, labels)["logps"]
    _report("logps", chunked.detach(), plain, 1e-5)


def test_tied_embedding_and_frozen_head_match_plain():
    """The chunked backward hands the head's weight gradient to autograd as one buffer; with the weight also used as
    an input embedding (tied, as in SmolLM2) both contributions must add up as in the plain path. With a frozen head
    (LoRA) only the hidden states get a gradient."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, :9] = IGNORE_INDEX
    upstream = torch.randn(B, T, generator=g)
    w0 = torch.randn(V, H, generator=g) * 0.3
    mix = torch.randn(H, H, generator=g) * 0.2

    def run(chunked, frozen):
        weight = w0.clone().requires_grad_(not frozen)
        lift = mix.clone().requires_grad_(True)
        hidden = torch.tanh(torch.nn.functional.embedding(ids, weight) @ lift)
        if chunked:
            out = token_stats(hidden, weight, labels, stats=("logps", "entropy"), chunk_size=10)
        else:
            out = token_stats_plain(hidden @ weight.T, labels, stats=("logps", "entropy"))
        ((out["logps"] + 0.3 * out["entropy"]) * upstream).sum().backward()
        return weight.grad, lift.grad

    for frozen in (False, True):
        (wc, lc), (wp, lp) = run(True, frozen), run(False, frozen)
        _report("grad lift", lc, lp, 1e-5)
        if frozen:
            assert wc is None and wp is None
        else:
            _report("grad tied weight", wc, wp, 1e-5)


def test_ref_logps_alone_and_no_labels():
    """Only the reference statistic (nothing to differentiate) and a batch without any label take the no-graph
    path and still return zeros / values of the right shape."""
    hidden, weight, _, ref_hidden, ref_weight, labels, _ = _inputs(2)
    out = token_stats(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, stats=("ref_logps",),
                      chunk_size=8)
    plain = token_stats_plain(hidden @ weight.T, labels, ref_logits=ref_hidden @ ref_weight.T, stats=("ref_logps",))
    _report("ref_logps", out["ref_logps"], plain["ref_logps"], 1e-5)
    empty = token_stats(hidden, weight, torch.full_like(labels, IGNORE_INDEX), stats=("logps",))
    assert empty["logps"].shape == labels.shape and (empty["logps"] == 0).all()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_embedding_grad_in_place_matches_autograd(checkpointed):
    """``hidden_states(..., embedding_grad_in_place=True)`` + ``.backward()`` leaves every parameter's ``.grad``
    (the tied embedding/LM head included, padding rows receiving none) equal to the ordinary autograd path's, also
    when gradients accumulate over two backward passes."""
    from tether.models import enable_gradient_checkpointing

    grads = []
    for in_place in (False, True):
        model = tiny_model(hidden_size=64, num_layers=2).train()
        if checkpointed:
            enable_gradient_checkpointing(model)
        w, b = lm_head(model)
        for seed in (0, 1):  # two micro-batches, accumulated
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, 259, (3, 9), generator=g)
            ids[0, 6:] = model.config.pad_token_id  # padding rows of the embedding get no gradient
            mask = (ids != model.config.pad_token_id).long()
            labels = torch.where(torch.rand(3, 9, generator=g) < 0.6, torch.roll(ids, -1, 1), IGNORE_INDEX)
            labels[mask == 0] = IGNORE_INDEX
            hidden = hidden_states(model, ids, mask, embedding_grad_in_place=in_place)
            out = token_stats(hidden, w, labels, bias=b, stats=("logps", "entropy"), chunk_size=5)
            (out["logps"].sum() + 0.3 * out["entropy"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)
