"""The distillation recipe end to end on tiny models: the logged divergence against a float64 oracle, which rows each
mode scores, the teacher cache, exact resume, the derived student, and a vocabulary mismatch as one line.

The teacher is a tiny two-layer Llama (``tether.testing``); the student is derived from it (every 2nd layer: one
layer), built in a temporary ``TETHER_CACHE``."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tether.cli import main
from tether.data import load_preference_dataset
from tether.losses.distill import adpa, adpa_advantages, dpkd_token, teacher_topk, topk_forward_kl
from tether.models import derive_student, load_model, load_tokenizer
from tether.recipes.distill import DistillConfig, response_source, step_rows, train
from tether.sampling import sample
from tether.sampling.mixing import TeacherMixture
from tether.testing import make_tiny_model_dir

TIMING_KEYS = {"gen_s", "step_s"}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("distill") / "teacher", seed=0))


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path_factory.getbasetemp() / "tether_cache"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill_data") / "pairs.jsonl"
    rows = [{"prompt": f"Write about topic {i}.", "chosen": f"Topic {i} is calm and kind.",
             "rejected": f"Topic {i}, well, is fine."} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill_eval") / "heldout.jsonl"
    rows = [{"prompt": f"Say something about {w}.", "constraints": [{"type": "no_commas"}], "n_constraints": 1}
            for w in ("rain", "tea")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny(teacher_dir, pairs, out, **overrides) -> DistillConfig:
    values = dict(output_dir=str(out), teacher_model=teacher_dir, train_file=pairs, steps=2, batch_size=4,
                  micro_batch_size=3, max_new_tokens=6, eval_prompts_file=None, eval_prompts=0, lr=1e-3,
                  progress=False, tensorboard=False, chunk_size=7)
    values.update(overrides)
    return DistillConfig(**values)


def test_derived_student_keeps_every_other_layer_of_the_teacher(teacher_dir):
    student = load_model(derive_student(teacher_dir, stride=2))
    teacher = load_model(teacher_dir)
    assert student.config.num_hidden_layers == 1 and teacher.config.num_hidden_layers == 2
    s, t = student.state_dict(), teacher.state_dict()
    for name, value in s.items():
        assert torch.equal(value, t[name]), name  # layer 0, embeddings, norm: copied from the teacher


def forward_kl_oracle(teacher_dir, pairs, cfg, side: str = "chosen", student_dir=None) -> tuple[float, int]:
    """Token mean of the forward KL(teacher ‖ student) over the ``side`` responses of step 1's rows, and their token
    count. Full logits of both models in float64, one unpadded sequence at a time."""
    tok = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir).double()
    student = load_model(student_dir or derive_student(teacher_dir, stride=2)).double()
    examples, _ = load_preference_dataset(pairs, tok, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in step_rows(len(examples), 0, cfg.batch_size, cfg.seed):
            p, c = examples[i].prompt_ids, getattr(examples[i], f"{side}_ids")
            x = torch.tensor([p + c])
            lp_t = F.log_softmax(teacher(x).logits[0, len(p) - 1:-1], -1)
            lp_s = F.log_softmax(student(x).logits[0, len(p) - 1:-1], -1)
            total += float((lp_t.exp() * (lp_t - lp_s)).sum())
            n += len(c)
    return total / n, n


def test_logged_divergence_is_the_exact_token_mean(teacher_dir, pairs, tmp_path):
    """Step 1 (before any update) logs the token mean of the forward KL(teacher ‖ student) over the response
    positions of its rows."""
    cfg = tiny(teacher_dir, pairs, tmp_path / "run", steps=1, divergence="forward_kl")
    logged = train(cfg).metrics[0]["divergence"]
    oracle, _ = forward_kl_oracle(teacher_dir, pairs, cfg)
    # fp32 log-probs of ~-5.5 carry ~1e-6 absolute rounding; the KL is a sum of p·(log p − log q) over them
    assert logged == pytest.approx(oracle, rel=1e-3, abs=1e-7)
    assert oracle > 1e-4  # a one-layer student differs from its teacher


def test_dckd_without_rejected_and_nll_is_off_policy_forward_kl(teacher_dir, pairs, tmp_path):
    """DCKD's neutral setting w_r = 0, w_sft = 0, w_c = 1 is word-level KD on the chosen responses: step 1 logs the
    same loss as off_policy forward KL (same rows, same micro-batches, same cached teacher)."""
    off = train(tiny(teacher_dir, pairs, tmp_path / "off", steps=1)).metrics[0]
    dc = train(tiny(teacher_dir, pairs, tmp_path / "dc", steps=1, mode="dckd", dckd_rejected_weight=0.0,
                    nll_weight=0.0)).metrics[0]
    assert dc["loss"] == pytest.approx(off["loss"], rel=1e-6)
    assert dc["kl_chosen"] == pytest.approx(off["divergence"], rel=1e-6)
    assert dc["rejected_tokens"] == 0  # w_r = 0: the rejected side is not computed


def test_dckd_scores_the_rejected_responses(teacher_dir, pairs, tmp_path):
    """With both sides weighted, step 1 scores every rejected token of its rows (count from the dataset) and logs
    each side's token-mean forward KL against the float64 oracle; the loss is w_c·KL_c + w_r·KL_r + w_sft·NLL."""
    cfg = tiny(teacher_dir, pairs, tmp_path / "dc", steps=1, mode="dckd", dckd_chosen_weight=0.7,
               dckd_rejected_weight=0.3, nll_weight=0.2)
    row = train(cfg).metrics[0]
    kl_c, n_c = forward_kl_oracle(teacher_dir, pairs, cfg, "chosen")
    kl_r, n_r = forward_kl_oracle(teacher_dir, pairs, cfg, "rejected")
    assert (row["chosen_tokens"], row["rejected_tokens"]) == (n_c, n_r) and n_r > 0
    assert row["kl_chosen"] == pytest.approx(kl_c, rel=1e-3, abs=1e-7)
    assert row["kl_rejected"] == pytest.approx(kl_r, rel=1e-3, abs=1e-7)
    assert abs(kl_r - kl_c) > 5e-3 * kl_c  # the sides differ by more than the tolerance: each log is its own side
    assert row["loss"] == pytest.approx(0.7 * row["kl_chosen"] + 0.3 * row["kl_rejected"] + 0.2 * row["nll"], rel=1e-5)


def binned_kl_oracle(teacher_dir, pairs, cfg, side: str, k: int) -> float:
    """Token mean of DCKD's binned forward KL (``topk_forward_kl`` at its defaults, teacher top-k + rest) over the
    ``side`` responses of step 1's rows, from full float64 logits of both models, one unpadded sequence at a time."""
    tok = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir).double()
    student = load_model(derive_student(teacher_dir, stride=2)).double()
    examples, _ = load_preference_dataset(pairs, tok, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in step_rows(len(examples), 0, cfg.batch_size, cfg.seed):
            p, c = examples[i].prompt_ids, getattr(examples[i], f"{side}_ids")
            x = torch.tensor([p + c])
            zt, zs = teacher(x).logits[0, len(p) - 1:-1], student(x).logits[0, len(p) - 1:-1]
            total += float(topk_forward_kl(zs, teacher_topk(zt, k)).sum())
            n += len(c)
    return total / n


def test_dckd_topk_store_against_the_uncompressed_kl(teacher_dir, pairs, tmp_path):
    """DCKD with the teacher stored as its top-k + rest (computed once per side, saved in output_dir). k = V − 1 (258;
    the tail is one token, whose renormalized KL is 0): each side's logged KL is the exact full-vocabulary one
    (float64 oracle; the clamps move it by < 1e-7 per token).
    k = 5: each side logs the binned KL of the float64 oracle, which is below the exact KL by rest_p × the tails' KL
    (> 2% of it here: the compression is visible)."""
    extra = dict(steps=1, mode="dckd", dckd_chosen_weight=0.7, dckd_rejected_weight=0.3, nll_weight=0.0)
    full = tiny(teacher_dir, pairs, tmp_path / "full", dckd_teacher_top_k=258, **extra)
    row_full = train(full).metrics[0]
    top5 = tiny(teacher_dir, pairs, tmp_path / "top5", dckd_teacher_top_k=5, **extra)
    row5 = train(top5).metrics[0]
    for side in ("chosen", "rejected"):
        exact, _ = forward_kl_oracle(teacher_dir, pairs, full, side)
        assert row_full[f"kl_{side}"] == pytest.approx(exact, rel=1e-3, abs=1e-6), side
        binned = binned_kl_oracle(teacher_dir, pairs, top5, side, 5)
        assert row5[f"kl_{side}"] == pytest.approx(binned, rel=1e-3, abs=1e-7), side
        assert exact - binned > 0.02 * exact, (side, exact, binned)
        assert (tmp_path / "top5" / f"teacher_top5_{side}.safetensors").is_file()
    assert row5["loss"] == pytest.approx(0.7 * row5["kl_chosen"] + 0.3 * row5["kl_rejected"], rel=1e-5)


def test_dpkd_at_student_equal_teacher_is_log2_with_zero_gradient(teacher_dir, pairs, tmp_path):
    """Student = teacher (the teacher's directory as the student): at every position the two argmaxes agree, so
    h_t = [log q(a_T) − log q(a_S)] − [log p(a_T) − log p(a_S)] = 0 and L_t = softplus(0) = log 2, gradient 0."""
    row = train(tiny(teacher_dir, pairs, tmp_path / "dpkd", steps=1, mode="dpkd", model=teacher_dir)).metrics[0]
    assert row["loss"] == pytest.approx(math.log(2.0), rel=1e-6)
    assert row["argmax_agree"] == 1.0
    assert row["grad_norm"] == 0.0


def test_dpkd_logs_the_token_level_dpkd_of_full_logits(teacher_dir, pairs, tmp_path):
    """Step 1 logs ``dpkd_token`` (token mean over the step's rows) computed on full float64 logits of both models,
    one unpadded sequence at a time, + nll_weight × NLL. The tiny models tie their head to the embeddings, and at
    random init every one of them predicts its input token: the student's final-norm gains are redrawn at random
    (some negative) so that the two argmaxes disagree and DPKD is not log 2 trivially."""
    other = str(make_tiny_model_dir(tmp_path / "other", seed=1))
    scrambled = load_model(other)
    with torch.no_grad():
        norm = scrambled.model.norm.weight
        norm.copy_(torch.randn(norm.shape, generator=torch.Generator().manual_seed(3)))
    scrambled.save_pretrained(other)
    cfg = tiny(teacher_dir, pairs, tmp_path / "dpkd", steps=1, mode="dpkd", dpkd_beta=0.5, nll_weight=0.3,
               model=other)
    row = train(cfg).metrics[0]
    tok = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir).double()
    student = load_model(other).double()
    examples, _ = load_preference_dataset(pairs, tok, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length)
    total, nll, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in step_rows(len(examples), 0, cfg.batch_size, cfg.seed):
            p, c = examples[i].prompt_ids, examples[i].chosen_ids
            x = torch.tensor([p + c])
            zt, zs = teacher(x).logits[:, len(p) - 1:-1], student(x).logits[:, len(p) - 1:-1]
            mask = torch.ones(1, len(c), dtype=torch.bool)
            total += dpkd_token(zs, zt, mask, beta=0.5).loss.item() * len(c)
            nll -= float(F.log_softmax(zs[0], -1).gather(-1, torch.tensor(c)[:, None]).sum())
            n += len(c)
    assert row["dpkd"] == pytest.approx(total / n, rel=1e-5)
    assert row["loss"] == pytest.approx((total + 0.3 * nll) / n, rel=1e-5)
    assert row["argmax_agree"] < 0.9 and row["grad_norm"] > 0  # the argmaxes disagree: the test is not at h ≡ 0


def test_minillm_logs_the_exact_single_step_reverse_kl(teacher_dir, pairs, tmp_path):
    """Step 1 samples one response per prompt from the (derived) student and logs the token mean of the exact
    per-position reverse KL(q ‖ p) over them. Oracle: the same samples (the sampler is deterministic for its seed and
    batch size), then full logits of both models in float64, one unpadded sequence at a time."""
    cfg = tiny(teacher_dir, pairs, tmp_path / "minillm", steps=1, mode="minillm")
    row = train(cfg).metrics[0]
    tok = load_tokenizer(teacher_dir)
    student_dir = derive_student(teacher_dir, stride=2)
    examples, _ = load_preference_dataset(pairs, tok, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length)
    prompts = [examples[i].prompt_ids for i in step_rows(len(examples), 0, cfg.batch_size, cfg.seed)]
    done = sample(load_model(student_dir), tok, prompts, n=1, max_new_tokens=cfg.max_new_tokens,
                  temperature=cfg.temperature, seed=cfg.seed * 100_003, batch_size=cfg.batch_size)
    teacher, student = load_model(teacher_dir).double(), load_model(student_dir).double()
    total, n = 0.0, 0
    with torch.no_grad():
        for p, c in zip(done.prompt_ids, done.completion_ids):
            x = torch.tensor([list(p) + list(c)])
            lp_t = F.log_softmax(teacher(x).logits[0, len(p) - 1:-1], -1)
            lp_s = F.log_softmax(student(x).logits[0, len(p) - 1:-1], -1)
            total += float((lp_s.exp() * (lp_s - lp_t)).sum())
            n += len(c)
    assert row["response_len"] == pytest.approx(n / len(prompts))
    assert row["single_step_kl"] == pytest.approx(total / n, rel=1e-3, abs=1e-7)
    assert total / n > 1e-4 and row["source_student"] == 1.0
    # ρ = 1 on the first pass: with whitened advantages (mean 0 over the step's tokens) the long-term term is 0
    assert row["long_term"] == pytest.approx(0.0, abs=1e-6) and row["clip_frac"] == 0.0


def test_minillm_at_student_equal_teacher_is_zero_loss_and_gradient(teacher_dir, pairs, tmp_path):
    """q = p: every reward log p − log q_old is 0, so every advantage is 0, and the single-step KL(q ‖ p) and its
    gradient are 0 at every position: zero loss, zero gradient. Tolerance: fp32 rounding. The student's forward pass
    (with autograd) and the teacher's (without) may differ in the last bit, and the KL's gradient q·(log q − log p −
    KL) carries the rounding of Σ q = 1 (~1e-8); the derived student's step 1 logs a KL of ~5e-4 per token and a
    gradient norm ~1.7 (whitened advantages of unit scale)."""
    row = train(tiny(teacher_dir, pairs, tmp_path / "qp", steps=1, mode="minillm", model=teacher_dir)).metrics[0]
    assert row["loss"] == pytest.approx(0.0, abs=1e-7) and row["single_step_kl"] == pytest.approx(0.0, abs=1e-7)
    assert row["long_term"] == 0.0  # rewards are 0 to the bit: q_old and p are both scored without autograd
    assert row["grad_norm"] == pytest.approx(0.0, abs=1e-6)


def sharp_student(path) -> str:
    """An independently initialized tiny model whose final-norm gains are redrawn ×4 (some negative): at random init
    the tiny models are near uniform over the vocabulary, so this one's distributions differ from the teacher's."""
    out = str(make_tiny_model_dir(path, seed=1))
    model = load_model(out)
    with torch.no_grad():
        norm = model.model.norm.weight
        norm.copy_(4 * torch.randn(norm.shape, generator=torch.Generator().manual_seed(3)))
    model.save_pretrained(out)
    return out


def test_minillm_teacher_mixed_sampling_logs_the_exact_importance_weights(teacher_dir, pairs, tmp_path):
    """α = 0.3: step 1 draws every token from p̃ = 0.3·p + 0.7·q (the same draw replayed here: the sampler with the
    same ``TeacherMixture``, seed and batch) and logs the token mean of w_t = q(y_t)/p̃(y_t) and of the exact
    single-step KL(q ‖ p) over those samples. Oracle: full logits of both models in float64, one unpadded sequence
    at a time. On the first pass (ρ = 1) the logged ratio mean is 1."""
    student_dir = sharp_student(tmp_path / "student")
    cfg = tiny(teacher_dir, pairs, tmp_path / "mixed", steps=1, mode="minillm", teacher_mixed_alpha=0.3,
               model=student_dir)
    row = train(cfg).metrics[0]
    tok = load_tokenizer(teacher_dir)
    examples, _ = load_preference_dataset(pairs, tok, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length)
    prompts = [examples[i].prompt_ids for i in step_rows(len(examples), 0, cfg.batch_size, cfg.seed)]
    mix = TeacherMixture(load_model(teacher_dir), prompts, alpha=0.3, temperature=cfg.temperature,
                         max_new_tokens=cfg.max_new_tokens)
    done = sample(load_model(student_dir), tok, prompts, n=1, max_new_tokens=cfg.max_new_tokens,
                  temperature=cfg.temperature, seed=cfg.seed * 100_003, batch_size=cfg.batch_size, processors=[mix])
    teacher, student = load_model(teacher_dir).double(), load_model(student_dir).double()
    weights, kl_sum = [], 0.0
    with torch.no_grad():
        for p, c in zip(done.prompt_ids, done.completion_ids):
            x, y = torch.tensor([list(p) + list(c)]), torch.tensor(c)[:, None]
            lp_t = F.log_softmax(teacher(x).logits[0, len(p) - 1:-1], -1)
            lp_s = F.log_softmax(student(x).logits[0, len(p) - 1:-1], -1)
            q, pt = lp_s.exp().gather(-1, y), lp_t.exp().gather(-1, y)
            weights.append(q / (0.3 * pt + 0.7 * q))
            kl_sum += float((lp_s.exp() * (lp_s - lp_t)).sum())
    w = torch.cat(weights)
    assert row["response_len"] == pytest.approx(len(w) / len(prompts))
    assert row["weight_mean"] == pytest.approx(float(w.mean()), rel=1e-5)
    assert float((w - 1).abs().max()) > 0.05  # the models differ: the weights are not all 1
    assert row["single_step_kl"] == pytest.approx(kl_sum / len(w), rel=1e-3, abs=1e-7)
    assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_minillm_ppo_epochs_update_on_the_same_rollout(teacher_dir, pairs, tmp_path):
    """ppo_epochs = 3: the first update of step 1 is the one-epoch run's step 1 (same rollout, same parameters: the
    same loss and gradient norm); the later updates see the updated student (ratio ≠ 1, logged as ``*_last``); the
    schedule counts 3 updates per step (a linear decay over steps × epochs)."""
    extra = dict(steps=2, mode="minillm", teacher_mixed_alpha=0.2, schedule="linear", warmup_ratio=0.0)
    one = train(tiny(teacher_dir, pairs, tmp_path / "one", **extra)).metrics
    three = train(tiny(teacher_dir, pairs, tmp_path / "three", ppo_epochs=3, **extra)).metrics
    for k in ("loss", "grad_norm", "single_step_kl", "weight_mean", "long_term"):
        assert three[0][k] == pytest.approx(one[0][k], rel=1e-6, abs=1e-9), k
    assert three[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert abs(three[0]["ratio_mean_last"] - 1.0) > 1e-4 and "clip_frac_last" in three[0]
    assert three[-1]["lr"] == pytest.approx(0.0) and one[-1]["lr"] == pytest.approx(0.0)
    assert three[0]["lr"] == pytest.approx(1e-3 * (1 - 3 / 6))


def test_minillm_resume_with_mixing_and_epochs_follows_the_uninterrupted_trajectory(teacher_dir, pairs, tmp_path):
    extra = dict(steps=3, mode="minillm", teacher_mixed_alpha=0.2, ppo_epochs=2, save_every=1)
    full = train(tiny(teacher_dir, pairs, tmp_path / "full", **extra))
    train(tiny(teacher_dir, pairs, tmp_path / "part", stop_after=1, **extra))
    resumed = train(tiny(teacher_dir, pairs, tmp_path / "part", resume=True, **extra))
    strip = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in full.metrics]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in resumed.metrics]
    a, b = load_model(tmp_path / "full" / "final").state_dict(), load_model(tmp_path / "part" / "final").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_teacher_mixing_and_epochs_are_minillm_only():
    with pytest.raises(ValueError, match="only mode 'minillm' reads them"):
        DistillConfig(mode="seqkd", teacher_mixed_alpha=0.2)
    with pytest.raises(ValueError, match="teacher_mixed_alpha=1.0 is out of range"):
        DistillConfig(mode="minillm", teacher_mixed_alpha=1.0)


def test_adpa_logs_the_advantage_term_of_full_logits(teacher_dir, pairs, tmp_path):
    """Three models: DPO teacher (the tiny teacher), reference (an independently initialized tiny model), student
    (derived). Step 1 logs the token mean of −Σ_{a ∈ top-k} q(a)·A(a), A = log π_dpo − log π_ref on π_dpo's top-k,
    over the student's own samples. Oracle: the same samples, full float64 logits, ``adpa`` itself."""
    ref = str(make_tiny_model_dir(tmp_path / "ref", seed=1))
    cfg = tiny(teacher_dir, pairs, tmp_path / "adpa", steps=1, mode="adpa", ref_model=ref, adpa_top_k=5,
               nll_weight=0.4)
    row = train(cfg).metrics[0]
    tok = load_tokenizer(teacher_dir)
    student_dir = derive_student(teacher_dir, stride=2)
    examples, _ = load_preference_dataset(pairs, tok, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length)
    prompts = [examples[i].prompt_ids for i in step_rows(len(examples), 0, cfg.batch_size, cfg.seed)]
    done = sample(load_model(student_dir), tok, prompts, n=1, max_new_tokens=cfg.max_new_tokens,
                  temperature=cfg.temperature, seed=cfg.seed * 100_003, batch_size=cfg.batch_size)
    dpo, reference, student = (load_model(d).double() for d in (teacher_dir, ref, student_dir))
    total, n = 0.0, 0
    with torch.no_grad():
        for p, c in zip(done.prompt_ids, done.completion_ids):
            x = torch.tensor([list(p) + list(c)])
            z = [m(x).logits[:, len(p) - 1:-1] for m in (dpo, reference, student)]
            ids, adv = adpa_advantages(z[0], z[1], top_k=5)
            total += adpa(z[2], ids, adv, torch.ones(1, len(c), dtype=torch.bool)).loss.item() * len(c)
            n += len(c)
    assert row["adpa"] == pytest.approx(total / n, rel=1e-4, abs=1e-7)
    assert abs(total / n) > 1e-3 and row["grad_norm"] > 0
    assert row["loss"] == pytest.approx(row["adpa"] + 0.4 * row["nll"], rel=1e-6) and row["nll"] > 1.0


def test_adpa_refuses_a_missing_reference():
    with pytest.raises(ValueError, match="ref_model: mode 'adpa' needs the reference teacher"):
        DistillConfig(mode="adpa")


def test_adpa_with_the_reference_as_dpo_teacher_is_zero(teacher_dir, pairs, tmp_path):
    """π_dpo = π_ref (the teacher directory as both): every advantage is 0, so the loss and its gradient are 0."""
    row = train(tiny(teacher_dir, pairs, tmp_path / "adpa0", steps=1, mode="adpa", ref_model=teacher_dir)).metrics[0]
    assert row["loss"] == 0.0 and row["advantage_mean"] == 0.0 and row["grad_norm"] == 0.0


@pytest.mark.parametrize("mode, lmbda, expected", [("off_policy", 0.5, "dataset"), ("seqkd", 0.5, "teacher"),
                                                   ("on_policy", 1.0, "student"), ("on_policy", 0.0, "dataset")])
def test_each_mode_scores_the_rows_it_names(teacher_dir, pairs, tmp_path, mode, lmbda, expected):
    """λ = 1 trains only on student samples, λ = 0 only on dataset responses; seqkd on teacher samples."""
    metrics = train(tiny(teacher_dir, pairs, tmp_path / mode, steps=3, mode=mode, lmbda=lmbda)).metrics
    for row in metrics:
        assert row["source_student"] == float(expected == "student")
        assert row["source_teacher"] == float(expected == "teacher")


def divergence_on_samples(teacher_dir, pairs, cfg, writer_dir, student_dir) -> float:
    """Token mean of the forward KL(teacher ‖ student) over step 1's responses when ``writer_dir``'s model wrote them:
    the sampler replayed (same seed and batch), then full float64 logits, one unpadded sequence at a time."""
    tok = load_tokenizer(teacher_dir)
    examples, _ = load_preference_dataset(pairs, tok, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length)
    prompts = [examples[i].prompt_ids for i in step_rows(len(examples), 0, cfg.batch_size, cfg.seed)]
    done = sample(load_model(writer_dir), tok, prompts, n=1, max_new_tokens=cfg.max_new_tokens,
                  temperature=cfg.temperature, seed=cfg.seed * 100_003, batch_size=cfg.batch_size)
    teacher, student = load_model(teacher_dir).double(), load_model(student_dir).double()
    total, n = 0.0, 0
    with torch.no_grad():
        for p, c in zip(done.prompt_ids, done.completion_ids):
            x = torch.tensor([list(p) + list(c)])
            lp_t = F.log_softmax(teacher(x).logits[0, len(p) - 1:-1], -1)
            lp_s = F.log_softmax(student(x).logits[0, len(p) - 1:-1], -1)
            total += float((lp_t.exp() * (lp_t - lp_s)).sum())
            n += len(c)
    return total / n


def test_lambda_and_seqkd_score_exactly_the_rows_they_name(teacher_dir, pairs, tmp_path):
    """Which responses step 1 scored, by their divergence: λ = 1 → the student's samples (float64 oracle on the
    replayed student draw), seqkd → the teacher's samples (replayed teacher draw), λ = 0 → the dataset responses
    (every logged number equals off_policy's, step for step). The three oracles differ from one another by more than
    the tolerance, so a mode scoring other rows would fail. The student is ``sharp_student`` (far from the near-uniform
    tiny teacher, so the KL depends on which responses are scored)."""
    student_dir = sharp_student(tmp_path / "student")
    on1 = tiny(teacher_dir, pairs, tmp_path / "on1", steps=1, mode="on_policy", lmbda=1.0, model=student_dir)
    kl_student = divergence_on_samples(teacher_dir, pairs, on1, student_dir, student_dir)
    assert train(on1).metrics[0]["divergence"] == pytest.approx(kl_student, rel=1e-3, abs=1e-7)
    seq = tiny(teacher_dir, pairs, tmp_path / "seq", steps=1, mode="seqkd", model=student_dir)
    kl_teacher = divergence_on_samples(teacher_dir, pairs, seq, teacher_dir, student_dir)
    assert train(seq).metrics[0]["divergence"] == pytest.approx(kl_teacher, rel=1e-3, abs=1e-7)
    kl_dataset, _ = forward_kl_oracle(teacher_dir, pairs, on1, student_dir=student_dir)
    for a, b in itertools.combinations([kl_student, kl_teacher, kl_dataset], 2):
        assert abs(a - b) > 1e-2 * max(a, b), (kl_student, kl_teacher, kl_dataset)
    on0 = train(tiny(teacher_dir, pairs, tmp_path / "on0", steps=3, mode="on_policy", lmbda=0.0,
                     model=student_dir)).metrics
    off = train(tiny(teacher_dir, pairs, tmp_path / "off", steps=3, mode="off_policy", model=student_dir)).metrics
    for a, b in zip(on0, off):
        assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in b.items() if k not in TIMING_KEYS}


def test_teacher_cache_is_fingerprinted(teacher_dir, pairs, tmp_path, capsys):
    """A cache written for one teacher is not read for another: the second run in the same output_dir recomputes
    (and says so), and logs what a fresh run with that teacher logs."""
    other = str(make_tiny_model_dir(tmp_path / "other_teacher", seed=2))
    train(tiny(teacher_dir, pairs, tmp_path / "shared", steps=1))
    again = train(tiny(other, pairs, tmp_path / "shared", steps=1, overwrite=True)).metrics[0]
    assert "was computed for another teacher or other data; recomputing" in capsys.readouterr().out
    fresh = train(tiny(other, pairs, tmp_path / "fresh", steps=1)).metrics[0]
    assert again["divergence"] == fresh["divergence"] and again["loss"] == fresh["loss"]


def test_on_policy_mixes_by_a_seeded_draw_per_step():
    cfg = DistillConfig(mode="on_policy", lmbda=0.5, train_file="x.jsonl")
    sources = [response_source(cfg, step) for step in range(200)]
    assert sources == [response_source(cfg, step) for step in range(200)]
    share = sources.count("student") / len(sources)
    assert 0.38 < share < 0.62  # Binomial(200, 0.5): ±3.4 standard deviations


def test_teacher_cache_gives_the_online_teacher(teacher_dir, pairs, tmp_path):
    runs = [train(tiny(teacher_dir, pairs, tmp_path / f"cache{c}", cache_teacher=c, nll_weight=0.5)).metrics
            for c in (True, False)]
    for a, b in zip(*runs):
        for k in ("loss", "divergence", "nll", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k
    assert (tmp_path / "cacheTrue" / "teacher_states.safetensors").is_file()


def test_resume_follows_the_uninterrupted_trajectory(teacher_dir, pairs, tmp_path):
    extra = dict(steps=4, mode="on_policy", lmbda=0.5, divergence="reverse_kl", save_every=1)
    full = train(tiny(teacher_dir, pairs, tmp_path / "full", **extra))
    train(tiny(teacher_dir, pairs, tmp_path / "part", stop_after=2, **extra))
    resumed = train(tiny(teacher_dir, pairs, tmp_path / "part", resume=True, **extra))
    strip = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in full.metrics]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in resumed.metrics]
    a, b = load_model(tmp_path / "full" / "final").state_dict(), load_model(tmp_path / "part" / "final").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_report_measures_both_directions_and_the_reward(teacher_dir, pairs, heldout, tmp_path):
    report = train(tiny(teacher_dir, pairs, tmp_path / "rep", eval_prompts_file=heldout,
                        kl_samples_per_prompt=2, eval_samples_per_prompt=1)).report
    for when in ("before", "after"):
        for direction in ("kl_student_teacher", "kl_teacher_student"):
            kl = report[when][direction]
            assert kl["completions"] == 2 * 2 and kl["token_kl"]["mean"] > 0
            for level in ("token_kl", "sequence_kl_rao_blackwell", "sequence_kl_monte_carlo"):
                lo, hi = kl[level]["ci95"]
                assert lo <= kl[level]["mean"] <= hi, level
        assert report[when]["reward"]["n"] == 2 and "reward_ci95_halfwidth" in report[when]["reward"]
    assert report["before"]["teacher_reward"]["n"] == 2 and "teacher_reward" not in report["after"]


def test_teacher_reward_is_the_students_when_the_student_is_the_teacher(teacher_dir, pairs, heldout, tmp_path):
    """The teacher's reward is sampled with the student's settings and seed: a student that IS the teacher (its own
    directory as ``model``) scores exactly the teacher's reward before training, and the KL is 0 both ways."""
    before = train(tiny(teacher_dir, pairs, tmp_path / "same", model=teacher_dir, eval_prompts_file=heldout,
                        kl_samples_per_prompt=1, eval_samples_per_prompt=2, steps=1)).report["before"]
    assert before["teacher_reward"] == before["reward"]
    assert before["kl_student_teacher"]["token_kl"]["mean"] == 0.0
    assert before["kl_teacher_student"]["token_kl"]["mean"] == 0.0


def test_vocabulary_mismatch_is_one_line(teacher_dir, pairs, tmp_path, capsys):
    """A student whose tokenizer maps tokens to other ids would be compared id by id with the wrong tokens."""
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    tok = load_tokenizer(other)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(other)
    code = main(["distill", "--teacher_model", teacher_dir, "--model", str(other), "--train_file", pairs,
                 "--output_dir", str(tmp_path / "mm"), "--no_progress"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "tether distill" in line]
    assert code == 2 and len(err) == 1 and "different vocabularies" in err[0]
