"""The preference recipe end to end on tiny models: resume, cached reference, log 2 at init, config and data errors.

Models are ``tether.testing`` tiny Llamas (vocab 259, hidden 32) written to disk, so ``train`` loads them exactly as
it loads any local model directory. Oracles are computed independently of tether's chunked path: one unpadded
forward pass per sequence through ``model(input_ids).logits``, ``log_softmax`` in float64, gather at the labels.

Tolerances: sequence sums are fp32 sums of 20–40 token log-probs of about −5.5 each (|sum| up to ≈ 220), so fp32
rounding alone is ~1e-5 absolute; sums are compared at rtol 1e-6 + atol 1e-5, per-pair losses at atol 1e-5.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tether.checkpoints import latest_checkpoint
from tether.data import DataError, collate_preference, load_preference_dataset
from tether.models import load_model
from tether.recipes.preference import PreferenceConfig, preference_step, reference_logps, train
from tether.testing import make_tiny_model_dir, tiny_tokenizer

MAX_LEN, MAX_PROMPT = 256, 128
# Completions of different lengths in each pair (so every batch is padded) and across pairs.
ROWS = [{"prompt": f"Question {i}: name a {w}.", "chosen": f"A fine {w}, number {i}." + " Really." * (i % 3),
         "rejected": "no " * (1 + i % 4) + w}
        for i, w in enumerate(["cat", "dog", "tree", "river", "cloud", "stone", "bird", "lamp", "road", "song"])]
QUIET = dict(tensorboard=False, progress=False, max_length=MAX_LEN, max_prompt_length=MAX_PROMPT)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"m0": str(make_tiny_model_dir(root / "m0", seed=0)), "m1": str(make_tiny_model_dir(root / "m1", seed=1)),
            "pairs": str(_write_jsonl(root / "pairs.jsonl", ROWS))}


@pytest.fixture(scope="module")
def examples(assets):
    tok = tiny_tokenizer()
    ex, report = load_preference_dataset(assets["pairs"], tok, max_length=MAX_LEN, max_prompt_length=MAX_PROMPT)
    assert report.rows_kept == len(ROWS)
    return tok, ex


@torch.no_grad()
def direct_logps(model, examples) -> torch.Tensor:
    """(N, 2) float64 summed log-probs [chosen, rejected], one unpadded full-logits forward per sequence."""
    out = torch.zeros(len(examples), 2, dtype=torch.float64)
    for i, ex in enumerate(examples):
        for j, completion in enumerate((ex.chosen_ids, ex.rejected_ids)):
            ids = torch.tensor([ex.prompt_ids + completion])
            logp = F.log_softmax(model(ids).logits[0].double(), dim=-1)
            P = len(ex.prompt_ids)
            # position t predicts token t+1: completion token k is predicted from position P-1+k
            out[i, j] = logp[P - 1:P - 1 + len(completion)].gather(-1, torch.tensor(completion)[:, None]).sum()
    return out


def dpo_by_hand(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """−log σ(β[(π_c − ref_c) − (π_r − ref_r)]) per pair, float64."""
    z = beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
    return -F.logsigmoid(z)


# ------------------------------------------------------------------------------------------------------ resume


def test_resume_reproduces_the_uninterrupted_trajectory(assets, tmp_path, capsys):
    """10 pairs, batch 3, accumulation 2, 2 epochs → 4 micro-batches/epoch (3+3+3+1 pairs), 4 optimizer steps.

    Run A goes straight through. Run B stops after step 2 (as if killed after its checkpoint), then resumes. Step
    3's loss needs the step-2 weights, its lr the scheduler state, step 4's update the AdamW moments: every
    metric of steps 3–4 and the final weights must equal run A's. A marker put into B's metrics.jsonl after the
    stop must survive, which shows steps 1–2 were not silently re-run from scratch.
    """
    cfg = dict(train_file=assets["pairs"], model=assets["m0"], batch_size=3, grad_accum=2, epochs=2, save_every=3,
               lr=1e-3, warmup_ratio=0.25, schedule="cosine", **QUIET)
    full = train(PreferenceConfig(output_dir=str(tmp_path / "a"), **cfg))
    assert full.steps == 4 and [m["step"] for m in full.metrics] == [1, 2, 3, 4]

    out_b = tmp_path / "b"
    stopped = train(PreferenceConfig(output_dir=str(out_b), stop_after=2, **cfg))
    assert stopped.steps == 2 and len(stopped.metrics) == 2
    ckpt = latest_checkpoint(out_b)
    assert ckpt is not None and ckpt.name == "step-2"
    for name in ("trainer_state.pt", "model.safetensors", "config.json", "tokenizer.json"):
        assert (ckpt / name).is_file(), f"checkpoint {ckpt} lacks {name}"
    leftovers = [p.name for p in (out_b / "checkpoints").iterdir() if p.name.startswith(".")]
    leftovers += [p.name for p in out_b.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary directories left behind: {leftovers}"
    assert not (out_b / "final").exists(), "a stopped run must not write the final model"

    lines = (out_b / "metrics.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "marker": 1})
    (out_b / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    resumed = train(PreferenceConfig(output_dir=str(out_b), resume=True, **cfg))
    assert "resumed from" in capsys.readouterr().out
    assert resumed.steps == 4 and [m["step"] for m in resumed.metrics] == [1, 2, 3, 4]
    assert resumed.metrics[0].get("marker") == 1, "steps 1-2 were recomputed instead of resumed"

    for a, b in zip(full.metrics, resumed.metrics):
        for key in ("loss", "margin", "grad_norm", "lr", "accuracy", "chosen_logps", "logratio", "tokens"):
            assert math.isclose(a[key], b[key], rel_tol=0, abs_tol=1e-7), \
                f"step {a['step']} {key}: {a[key]} (uninterrupted) vs {b[key]} (resumed)"
    assert full.metrics[-1]["lr"] == 0.0 and full.metrics[2]["loss"] < full.metrics[0]["loss"]

    wa, wb = load_file(tmp_path / "a" / "final" / "model.safetensors"), load_file(out_b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"final weight {k} differs after resume"
    w0 = load_file(Path(assets["m0"]) / "model.safetensors")
    assert not torch.equal(w0["model.embed_tokens.weight"], wa["model.embed_tokens.weight"]), "nothing was trained"


# ------------------------------------------------------------------------------------- the cached reference


def test_cached_reference_equals_live_full_logits(assets, examples):
    """``reference_logps`` (padded batches of 3, chunks of 5 positions) = unpadded full-logits sums."""
    tok, ex = examples
    ref = load_model(assets["m0"])
    cached = reference_logps(ref, ex, pad_token_id=tok.pad_token_id, batch_size=3, chunk_size=5)
    assert cached.shape == (len(ex), 2)
    torch.testing.assert_close(cached.double(), direct_logps(ref, ex), rtol=1e-6, atol=1e-5)


def test_dpo_step_with_cached_reference_matches_hand_computation(assets, examples):
    """DPO through ``preference_step`` (policy seed 1, cached log-probs of reference seed 0, β = 0.5) equals
    −log σ(β·[(π_c − ref_c) − (π_r − ref_r)]) with every log-prob taken from full logits of the live models.
    The two seeds differ by ~1 nat per pair in their log-ratio, so the loss is far from log 2 here."""
    tok, ex = examples
    policy, ref = load_model(assets["m1"]), load_model(assets["m0"])
    cached = reference_logps(ref, ex, pad_token_id=tok.pad_token_id, batch_size=4, chunk_size=7)
    idx = [7, 2, 9, 0]
    batch = collate_preference([ex[i] for i in idx], tok.pad_token_id)
    cfg = PreferenceConfig(loss="dpo", beta=0.5, chunk_size=7)
    loss, metrics = preference_step(policy, batch, cfg=cfg, ref_logps=cached[idx])

    sub = [ex[i] for i in idx]
    pol, live_ref = direct_logps(policy, sub), direct_logps(ref, sub)
    expected = dpo_by_hand(pol, live_ref, 0.5)
    assert (expected - math.log(2)).abs().max() > 0.05, "the oracle should not sit at the init value"
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-5)
    margin = 0.5 * ((pol[:, 0] - live_ref[:, 0]) - (pol[:, 1] - live_ref[:, 1]))
    assert math.isclose(metrics["margin"], margin.mean().item(), abs_tol=1e-5)
    assert math.isclose(metrics["loss"], expected.mean().item(), abs_tol=1e-5)
    loss.mean().backward()  # the policy side carries gradient; the cached reference does not
    assert policy.model.embed_tokens.weight.grad is not None


def test_separate_reference_model_is_the_one_cached(assets, examples, tmp_path):
    """ref_model = a second tiny model (seed 1), policy seed 0: the cached log-probs are seed 1's, not the
    policy's, and step 1's loss is the hand DPO loss of policy 0 against reference 1 (mean over all 10 pairs,
    which form the single micro-batch of step 1)."""
    out = tmp_path / "run"
    result = train(PreferenceConfig(train_file=assets["pairs"], model=assets["m0"], ref_model=assets["m1"],
                                    output_dir=str(out), batch_size=10, max_steps=1, beta=0.5, **QUIET))
    cached = load_file(out / "reference_logps.safetensors")["logps"].double()
    _, ex = examples
    ref_lp, pol_lp = direct_logps(load_model(assets["m1"]), ex), direct_logps(load_model(assets["m0"]), ex)
    torch.testing.assert_close(cached, ref_lp, rtol=1e-6, atol=1e-5)
    assert (cached - pol_lp).abs().mean() > 0.1, "the cache holds the policy's log-probs, not the reference's"
    expected = dpo_by_hand(pol_lp, ref_lp, 0.5).mean().item()
    assert math.isclose(result.metrics[0]["loss"], expected, abs_tol=1e-5)
    assert abs(expected - math.log(2)) > 0.02


# ------------------------------------------------------------------------------------------ log 2 at init


@pytest.mark.parametrize("overrides", [
    dict(loss="dpo"),
    dict(loss="f_dpo", loss_args={"divergence": "js"}),
    dict(loss="tdpo", loss_args={"variant": 2, "alpha": 0.5}),
    dict(loss="ra_dpo"),
    dict(loss="dpo", lora=True, lora_r=4),
], ids=["dpo", "f_dpo_js", "tdpo_online_ref", "ra_dpo", "dpo_lora"])
def test_first_step_loss_is_log2_when_policy_is_reference(assets, tmp_path, overrides):
    """At step 1 the policy is the reference, so every log-ratio is 0: DPO's −log σ(β·0) = log 2; f-DPO with JS
    has f'(1) = log(2·1/(1+1)) = 0 on both sides, again log 2; TDPO's sequential KL terms and Ra-DPO's risk terms
    are KLs of identical distributions, 0, leaving −log σ(0) = log 2. With LoRA the adapters' B = 0 at init, so
    the adapted policy equals the adapters-off reference."""
    result = train(PreferenceConfig(train_file=assets["pairs"], model=assets["m0"], output_dir=str(tmp_path),
                                    batch_size=4, max_steps=1, beta=0.5, **overrides, **QUIET))
    first = result.metrics[0]
    assert first["step"] == 1
    assert abs(first["loss"] - math.log(2)) < 1e-6, first
    assert abs(first["margin"]) < 1e-6 and abs(first["logratio"]) < 1e-6, first
    if overrides["loss"] in ("tdpo", "ra_dpo"):  # online reference: exact full-vocabulary KL per response token
        assert abs(first["token_kl"]) < 1e-6, first
    assert first["grad_norm"] > 0, "log 2 is the value, not a stationary point: the gradient must be non-zero"
    assert (tmp_path / "final" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("kwargs, names", [
    (dict(loss="dpx"), ["loss", "dpx", "dpo"]),
    (dict(loss="dpo", loss_args={"divergence": "js"}), ["loss_args", "divergence", "dpo"]),
    (dict(loss="f_dpo", loss_args={"alpah": 0.5}), ["loss_args", "alpah"]),
    (dict(batch_size=0), ["batch_size"]),
    (dict(grad_accum=0), ["grad_accum"]),
    (dict(lr=-1.0), ["lr"]),
    (dict(loss="ra_dpo", loss_args={"split_risk_ratio": True}), ["split_risk_ratio", "sequential_risk"]),
    (dict(loss="ra_dpo", loss_args={"chosen_seq_risk_split": 1.0}), ["loss_args", "chosen_seq_risk_split"]),
    (dict(max_grad_norm=float("nan")), ["max_grad_norm"]),
])
def test_bad_config_fails_at_construction_naming_the_field(kwargs, names):
    with pytest.raises(ValueError) as err:
        PreferenceConfig(**kwargs)
    for name in names:
        assert name in str(err.value), f"{name!r} missing from: {err.value}"


# ----------------------------------------------------------------------------------------------- data errors


def test_bad_row_raises_with_file_row_field_and_skip_trains_on_the_rest(assets, tmp_path, capsys):
    """Row 3 lacks 'rejected'. on_error='raise' stops before training, naming file, row and field; 'skip' drops
    that row (counted in the printed report) and trains on the other 9."""
    rows = [dict(r) for r in ROWS]
    del rows[3]["rejected"]
    bad = _write_jsonl(tmp_path / "bad_pairs.jsonl", rows)
    common = dict(train_file=str(bad), model=assets["m0"], batch_size=9, max_steps=1, **QUIET)
    with pytest.raises(DataError) as err:
        train(PreferenceConfig(output_dir=str(tmp_path / "raise"), on_error="raise", **common))
    msg = str(err.value)
    assert "bad_pairs.jsonl" in msg and "row 3" in msg and "'rejected'" in msg and "on_error='skip'" in msg, msg
    assert not (tmp_path / "raise" / "metrics.jsonl").exists()

    capsys.readouterr()
    result = train(PreferenceConfig(output_dir=str(tmp_path / "skip"), on_error="skip", **common))
    printed = capsys.readouterr().out
    assert "read 10 rows, kept 9, dropped 1" in printed, printed
    assert result.steps == 1 and (tmp_path / "skip" / "final").is_dir()
    assert result.metrics[0]["tokens"] > 0 and abs(result.metrics[0]["loss"] - math.log(2)) < 1e-6


def test_gradient_checkpointing_does_not_change_training(assets, tmp_path):
    """Recomputing the backbone's activations in the backward pass gives the same updates (fp32 round-off only)."""
    finals = []
    for gc in (False, True):
        out = tmp_path / f"gc{gc}"
        train(PreferenceConfig(train_file=assets["pairs"], output_dir=str(out), model=assets["m0"], max_steps=2,
                               lr=1e-3, gradient_checkpointing=gc, **QUIET))
        finals.append(load_model(out / "final").state_dict())
    start = load_model(assets["m0"]).state_dict()
    assert max((finals[0][k] - start[k]).abs().max().item() for k in start) > 1e-4
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_kto_under_torchrun_is_refused_at_config_time(tmp_path, mode):
    """KTO's reference point z₀ = mean over the micro-batch of KL(π‖π_ref) estimates: under DDP each rank would
    average only its own rows, a different loss than one process's. Refused before anything loads; DPO is not."""
    with pytest.raises(ValueError, match=r"^loss: 'kto' with distributed: .* use distributed: none"):
        PreferenceConfig(output_dir=str(tmp_path), loss="kto", distributed=mode)
    PreferenceConfig(output_dir=str(tmp_path), loss="dpo", distributed=mode)
