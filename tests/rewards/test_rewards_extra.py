"""Math-answer, tag-format, combined, overlong-shaping and reward-model rewards; the arithmetic task."""

import threading

import pytest
import torch

from tether.rewards import (
    CombinedRuleReward,
    MathAnswerReward,
    OverlongPenalty,
    RewardModel,
    TagFormatReward,
    dapo_overlong_penalty,
    extract_answer,
    weighted_sum,
)
from tether.tasks.arithmetic import all_problems, make_arithmetic_prompts, problems

# ----------------------------------------------------------------------------------------------------
# MathAnswerReward
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gold", ["1/2", "0.5", "\\frac{1}{2}", 0.5])
@pytest.mark.parametrize(
    "completion",
    [
        "Half of it. \\boxed{0.5}",
        "So the result is \\boxed{\\frac{1}{2}}.",
        "\\boxed{\\dfrac{1}{2}}",
        "<think>1 of 2</think><answer>1/2</answer>",
        "<answer> $0.5$ </answer>",
        "The answer is 1/2.",
        "The final answer is: $\\frac{1}{2}$",
    ],
)
def test_math_equivalent_forms(gold, completion):
    """1/2, 0.5 and \\frac{1}{2} are the same number whichever side (gold or completion) writes which form."""
    assert MathAnswerReward()("q", completion, {"answer": gold}) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{1/3}",  # wrong value
        "The answer is 0.25.",  # wrong value
        "I think it is 0.5",  # right value but not stated in one of the three forms
        "\\boxed{0.5",  # unclosed box: nothing extracted
        "<answer></answer>",  # empty span
        "\\boxed{\\frac{1}{2}",  # unbalanced braces
        "",
    ],
)
def test_math_wrong_or_unparseable_scores_zero(completion):
    assert MathAnswerReward()("q", completion, {"answer": "1/2"}) == 0.0


def test_math_extraction_order_and_last_match():
    """\\boxed beats <answer>, which beats "The answer is"; within a form the last match counts."""
    assert extract_answer("<answer>3</answer> The answer is 5. \\boxed{4}") == "4"
    assert extract_answer("The answer is 5. <answer>3</answer>") == "3"
    assert extract_answer("The answer is 5. No, the answer is 6.") == "6"
    assert extract_answer("\\boxed{3}, no wait: \\boxed{\\frac{7}{2}}") == "\\frac{7}{2}"
    assert extract_answer("it is 4") is None
    r = MathAnswerReward()
    assert r("q", "<answer>3</answer> \\boxed{4}", {"answer": 4}) == 1.0
    assert r("q", "<answer>3</answer> \\boxed{4}", {"answer": 3}) == 0.0


def test_math_none_without_answer_and_bad_gold_raises():
    r = MathAnswerReward()
    assert r("q", "\\boxed{1}", {}) is None
    assert r("q", "\\boxed{1}", {"answer": None}) is None
    with pytest.raises(ValueError, match="row id='m7'.*could not be parsed"):
        r("q", "\\boxed{1}", {"answer": "", "id": "m7"})


def test_math_off_main_thread():
    """math-verify's signal-based timeout cannot run in a thread; the reward must still score, not return 0."""
    out = []
    t = threading.Thread(target=lambda: out.append(MathAnswerReward()("q", "\\boxed{0.5}", {"answer": "1/2"})))
    t.start()
    t.join()
    assert out == [1.0]


# ----------------------------------------------------------------------------------------------------
# Arithmetic task
# ----------------------------------------------------------------------------------------------------


def test_arithmetic_splits_disjoint_and_complete():
    """49·49 additions + 49·50/2 subtractions (a >= b) = 2401 + 1225 = 3626; 20 % → 725 held out."""
    train, heldout = problems("train"), problems("heldout")
    assert (len(train), len(heldout)) == (2901, 725)
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(all_problems())
    assert len(all_problems()) == 3626


def test_arithmetic_rows_correct_deterministic_prefix():
    rows = make_arithmetic_prompts(300, seed=3)
    assert rows == make_arithmetic_prompts(300, seed=3)
    assert make_arithmetic_prompts(40, seed=3) == rows[:40]
    assert make_arithmetic_prompts(40, seed=4) != rows[:40]
    for row in rows:
        a, b, op = row["a"], row["b"], row["op"]
        assert 1 <= a < 50 and 1 <= b < 50 and op in "+-"
        assert row["answer"] == (a + b if op == "+" else a - b) >= 0
        assert f"{a}" in row["question"] and f"{b}" in row["question"]
        assert row["prompt"].startswith(row["question"])
    assert len({(r["a"], r["op"], r["b"]) for r in rows}) == 300  # no repeats
    heldout = make_arithmetic_prompts(725, seed=0, split="heldout")
    assert not {(r["a"], r["op"], r["b"]) for r in heldout} & set(problems("train"))
    with pytest.raises(ValueError, match="725 distinct problems"):
        make_arithmetic_prompts(726, seed=0, split="heldout")


def test_arithmetic_rows_score_with_math_reward():
    r = MathAnswerReward()
    for row in make_arithmetic_prompts(5, seed=0):
        assert r(row["prompt"], f"... The answer is {row['answer']}.", row) == 1.0
        assert r(row["prompt"], f"... The answer is {row['answer'] + 1}.", row) == 0.0


# ----------------------------------------------------------------------------------------------------
# TagFormatReward
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>2+2 is 4</think> <answer>4</answer>", 1.0),
        ("Sure. <think>x</think>\n<answer>4</answer> bye", 1.0),  # text around the blocks is allowed
        ("<answer>4</answer><think>x</think>", 0.0),  # wrong order
        ("<think>a</think><think>b</think><answer>4</answer>", 0.0),  # think twice
        ("<think>a</think><answer>4</answer><answer>5</answer>", 0.0),  # answer twice
        ("<think>a<answer>4</answer></think>", 0.0),  # nested, not in sequence
        ("<think>a<answer>4</answer>", 0.0),  # unclosed think
        ("<think>x</think>", 0.0),  # answer missing
        ("<think> </think><answer>4</answer>", 0.0),  # empty reasoning
        ("<think>x</think><answer>\n</answer>", 0.0),  # empty answer
        ("<THINK>x</THINK><answer>4</answer>", 0.0),  # case-sensitive
        ("", 0.0),
    ],
)
def test_tag_format(completion, expected):
    assert TagFormatReward()("q", completion, {}) == expected


def test_tag_format_strict_and_custom_tags():
    strict = TagFormatReward(strict=True)
    assert strict("q", " <think>x</think>\n<answer>4</answer>\n", {}) == 1.0
    assert strict("q", "Sure. <think>x</think><answer>4</answer>", {}) == 0.0
    custom = TagFormatReward(tags=("reasoning", "answer", "confidence"))
    assert custom("q", "<reasoning>r</reasoning><answer>4</answer><confidence>0.9</confidence>", {}) == 1.0
    assert custom("q", "<reasoning>r</reasoning><answer>4</answer>", {}) == 0.0
    with pytest.raises(ValueError, match="distinct"):
        TagFormatReward(tags=("a", "a"))


# ----------------------------------------------------------------------------------------------------
# CombinedRuleReward / weighted_sum
# ----------------------------------------------------------------------------------------------------


def _const(v):
    return lambda prompt, completion, metadata: v


def test_weighted_combination_by_hand_with_none():
    """Weights {math: 2, format: 1, code: 1}, scores {1.0, 0.0, None}: code has no opinion, so
    R = (2·1.0 + 1·0.0) / (2 + 1) = 2/3 (renormalized), or 2·1.0 + 1·0.0 = 2.0 (plain weighted sum)."""
    spec = {"math": (_const(1.0), 2.0), "format": (_const(0.0), 1.0), "code": (_const(None), 1.0)}
    combined = weighted_sum(spec)
    assert combined.components("p", "c", {}) == {"math": 1.0, "format": 0.0, "code": None}
    assert combined("p", "c", {}) == pytest.approx(2 / 3, abs=1e-12)
    assert weighted_sum(spec, renormalize=False)("p", "c", {}) == pytest.approx(2.0, abs=1e-12)
    # Without the None component the weights are 2, 1, 1: (2·1 + 1·0 + 1·0.5) / 4 = 0.625.
    spec["code"] = (_const(0.5), 1.0)
    assert weighted_sum(spec)("p", "c", {}) == pytest.approx(0.625, abs=1e-12)


def test_weighted_combination_all_none_and_validation():
    assert weighted_sum({"a": (_const(None), 1.0)})("p", "c", {}) is None
    with pytest.raises(ValueError, match="'a': weight must be"):
        CombinedRuleReward({"a": (_const(1.0), 0.0)})
    with pytest.raises(ValueError, match="'a' returned 'yes'"):
        weighted_sum({"a": (_const("yes"), 1.0)})("p", "c", {})
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum({})


def test_combined_real_rewards():
    """Correct boxed answer (1.0, weight 1) with bad format (0.0, weight 0.25): 1 / 1.25 = 0.8."""
    r = weighted_sum({"acc": (MathAnswerReward(), 1.0), "format": (TagFormatReward(), 0.25)})
    assert r("q", "\\boxed{7}", {"answer": 7}) == pytest.approx(0.8, abs=1e-12)
    assert r("q", "<think>3+4</think><answer>7</answer>", {"answer": 7}) == 1.0
    assert r("q", "<think>3+4</think><answer>7</answer>", {}) == 1.0  # acc abstains: format alone


# ----------------------------------------------------------------------------------------------------
# DAPO overlong shaping
# ----------------------------------------------------------------------------------------------------


def test_overlong_penalty_spec_oracle():
    """Spec §3: L_max = 20480, L_buf = 4096: the window starts after 16384; 18432 is half-way (−0.5)."""
    assert dapo_overlong_penalty(16384, 20480, 4096) == 0.0
    assert dapo_overlong_penalty(16385, 20480, 4096) == pytest.approx(-1 / 4096, abs=1e-15)
    assert dapo_overlong_penalty(18432, 20480, 4096) == pytest.approx(-0.5, abs=1e-15)
    assert dapo_overlong_penalty(20480, 20480, 4096) == pytest.approx(-1.0, abs=1e-15)
    assert dapo_overlong_penalty(20481, 20480, 4096) == -1.0
    assert dapo_overlong_penalty(10**6, 20480, 4096) == -1.0


def test_overlong_penalty_small_by_hand():
    """max_len 10, cache 4: free up to 6; then (6 − |y|) / 4: 7 → −0.25, 8 → −0.5, 10 → −1; beyond → −1.
    With κ = 0.5 every value halves."""
    values = [dapo_overlong_penalty(n, 10, 4) for n in (0, 6, 7, 8, 9, 10, 11)]
    assert values == pytest.approx([0, 0, -0.25, -0.5, -0.75, -1, -1], abs=1e-15)
    assert dapo_overlong_penalty(8, 10, 4, penalty_factor=0.5) == pytest.approx(-0.25, abs=1e-15)
    assert dapo_overlong_penalty(3, 4, 4) == pytest.approx(-0.75, abs=1e-15)  # cache = whole length
    for bad in [(-1, 10, 4), (5, 10, 0), (5, 4, 10), (5.0, 10, 4)]:
        with pytest.raises(ValueError):
            dapo_overlong_penalty(*bad)


def test_overlong_reward_wrapper_and_dapo_sum():
    """DAPO's reward = accuracy + overlong term: correct (1.0) at 8 tokens of max 10 / cache 4 → 1 − 0.5."""
    pen = OverlongPenalty(max_len=10, cache_len=4)
    assert pen("q", "c", {"completion_tokens": 8}) == pytest.approx(-0.5, abs=1e-15)
    with pytest.raises(KeyError, match="row id='r1'.*completion_tokens"):
        pen("q", "c", {"id": "r1"})
    dapo = weighted_sum({"acc": (MathAnswerReward(), 1.0), "overlong": (pen, 1.0)}, renormalize=False)
    assert dapo("q", "\\boxed{3}", {"answer": 3, "completion_tokens": 8}) == pytest.approx(0.5, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# RewardModel
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tether.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.5,  # scores of order 1, so the 1e-5 comparisons below are not vacuous
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("tiny_rm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


PAIRS = [
    ("What is 2+2?", "4"),
    ("Name a color.", "Blue, like the sky on a clear summer day."),
    ("Hi", ""),
    ("Explain rain in one sentence, please.", "Water vapour condenses into drops that fall."),
    ("Say yes.", "yes"),
]


def test_reward_model_padding_invariance_and_oracle(tiny_rm_dir):
    """Batched scores (right-padded, batch of 3 then 2, mixed lengths) equal one-by-one scores at fp32 1e-5,
    and both equal the oracle: the score head applied to the last hidden state of the unpadded sequence."""
    prompts, completions = zip(*PAIRS, strict=True)
    batched = RewardModel(tiny_rm_dir, batch_size=3).score_batch(prompts, completions)
    single = RewardModel(tiny_rm_dir, batch_size=1)
    one_by_one = [single(p, c, {}) for p, c in PAIRS]
    lengths = {len(single.encode(p, c)) for p, c in PAIRS}
    assert len(lengths) == len(PAIRS)  # every batch really is padded
    assert torch.tensor(batched).std() > 0.05  # scores differ, so equality below means something
    diff = (torch.tensor(batched) - torch.tensor(one_by_one)).abs()
    assert diff.max() < 1e-5, f"mismatch at {diff.nonzero().flatten().tolist()}: {batched} vs {one_by_one}"

    model = single.model
    for (p, c), s in zip(PAIRS, one_by_one, strict=True):
        ids = torch.tensor([single.encode(p, c)])
        with torch.no_grad():
            h = model.model(input_ids=ids).last_hidden_state[0, -1]
            oracle = float(model.score(h)[0])
        assert abs(s - oracle) < 1e-5


def test_reward_model_deterministic_and_chat_template(tiny_rm_dir):
    rm = RewardModel(tiny_rm_dir, batch_size=2)
    prompts, completions = zip(*PAIRS, strict=True)
    assert rm.score_batch(prompts, completions) == rm.score_batch(prompts, completions)
    text = rm.tokenizer.decode(rm.encode("Q?", "A."))
    assert text == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
    assert rm("Q?", "A.", {}) == rm.score_batch(["Q?"], ["A."])[0]


def test_reward_model_truncation_counted_and_errors(tiny_rm_dir, tmp_path):
    rm = RewardModel(tiny_rm_dir, batch_size=2, max_length=40)
    with pytest.warns(UserWarning, match="1 of 2 reward-model inputs exceed max_length=40"):
        rm.score_batch(["a", "b"], ["x", "y" * 50])
    assert rm.n_truncated == 1
    with pytest.raises(ValueError, match="not a local directory"):
        RewardModel(tmp_path / "missing")
    with pytest.raises(ValueError, match="pass tokenizer="):
        RewardModel(rm.model)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        rm.score_batch(["a", "b"], ["x"])


def test_reward_model_refuses_a_causal_lm(tmp_path):
    """A causal LM given as a reward model would load with a random score head: refused before and after loading
    (the architecture check, and the loading report's missing keys when config.json names no architecture)."""
    import json

    from tether.testing import make_tiny_model_dir

    lm = make_tiny_model_dir(tmp_path / "lm")
    with pytest.raises(ValueError, match="LlamaForCausalLM, not a sequence classifier"):
        RewardModel(lm)
    config = json.loads((lm / "config.json").read_text())
    config.pop("architectures")
    config["num_labels"] = 1
    (lm / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no weights for \['score.weight'\]"):
        RewardModel(lm)
