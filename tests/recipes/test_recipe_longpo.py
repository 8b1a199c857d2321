"""LongPO's reference is scored on the short context (`ref_prompt`), the policy on the long prompt."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tether.data import load_preference_dataset
from tether.models import load_model, load_tokenizer
from tether.recipes.preference import PreferenceConfig, reference_logps, train
from tether.testing import make_tiny_model_dir


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_model_dir(tmp_path / "tiny")


def test_longpo_reference_uses_the_short_context(tmp_path, tiny):
    long_rows = [{"prompt": f"A long document number {i} with many words. Question {i}?",
                  "ref_prompt": f"Chunk {i}. Question {i}?",
                  "chosen": f"good answer {i}", "rejected": f"bad answer {i}!"} for i in range(4)]
    data = _write(tmp_path / "longpo.jsonl", long_rows)
    cfg = PreferenceConfig(train_file=str(data), model=str(tiny), output_dir=str(tmp_path / "run"), loss="longpo",
                           max_steps=1, batch_size=2, tensorboard=False, progress=False)
    train(cfg)
    cached = load_file(tmp_path / "run" / "reference_logps.safetensors")["logps"]

    tok, ref = load_tokenizer(tiny), load_model(tiny)
    short = _write(tmp_path / "short.jsonl", [{"prompt": r["ref_prompt"], "chosen": r["chosen"],
                                               "rejected": r["rejected"]} for r in long_rows])
    short_examples, _ = load_preference_dataset(short, tok, max_length=512, max_prompt_length=256)
    long_examples, _ = load_preference_dataset(data, tok, max_length=512, max_prompt_length=256)
    kw = dict(pad_token_id=tok.pad_token_id, batch_size=3, chunk_size=7)
    expected = reference_logps(ref, short_examples, **kw)
    on_long_prompt = reference_logps(ref, long_examples, **kw)
    assert torch.allclose(cached, expected, atol=1e-5)
    assert not torch.allclose(cached, on_long_prompt, atol=1e-3)  # the context really changed the reference


def test_longpo_without_ref_prompt_names_the_field(tmp_path, tiny):
    data = _write(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    cfg = PreferenceConfig(train_file=str(data), model=str(tiny), output_dir=str(tmp_path / "run"), loss="longpo",
                           max_steps=1, tensorboard=False, progress=False)
    with pytest.raises(ValueError, match=r"row 0: field 'ref_prompt'"):
        train(cfg)


def test_longpo_reads_the_training_file_once(tmp_path, tiny, monkeypatch):
    """The short contexts are already in each example's metadata: the reference pass must not re-read (and
    re-tokenize) the training file to find them."""
    import tether.data
    import tether.data.preference

    calls = []
    original = tether.data.preference.load_rows

    def counting(path):
        calls.append(str(path))
        return original(path)

    monkeypatch.setattr(tether.data.preference, "load_rows", counting)
    monkeypatch.setattr(tether.data, "load_rows", counting)
    rows = [{"prompt": f"A long document {i}. Question?", "ref_prompt": f"Chunk {i}. Question?",
             "chosen": f"good {i}", "rejected": f"bad {i}!"} for i in range(2)]
    data = _write(tmp_path / "longpo.jsonl", rows)
    train(PreferenceConfig(train_file=str(data), model=str(tiny), output_dir=str(tmp_path / "run"), loss="longpo",
                           max_steps=1, batch_size=2, tensorboard=False, progress=False))
    assert calls == [str(data)]
