"""Tiny, randomly initialised models and tokenizers built in code, for tests and smoke runs.

Nothing here touches the network or the embedded model: a byte-level tokenizer (256 byte tokens plus three
ChatML special tokens) and a two-layer Llama with a vocabulary of that size. `make_tiny_model_dir` writes both
as an ordinary Hugging Face model directory, so every code path that loads "any local HF model directory"
(the CLI, the recipes, example configs) can be exercised in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer():
    """A byte-level tokenizer with 259 tokens and a ChatML chat template (eos = ``<|im_end|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(vocab_size: int = 259, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised Llama-architecture causal LM (tied embeddings, fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=2 + 256,  # <|im_end|> in tiny_tokenizer()
        pad_token_id=256,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def make_tiny_model_dir(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer to ``path`` as a plain HF directory (safetensors); return the path."""
    path = Path(path)
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", *, atol: float = 1e-5,
                 rtol: float = 0.0) -> None:
    """``|actual − expected| ≤ atol + rtol·|expected|`` elementwise, compared in float64; on failure the message
    lists up to 20 offending indices with both values.

    The default ``atol = 1e-5`` is for an fp32 computation against a float64 twin of the same formula on inputs of
    order one; a test whose values are larger, or that compares two fp32 paths accumulating in different orders,
    should pass an ``rtol`` (or tolerance) derived from its own float noise.
    """
    actual = torch.as_tensor(actual).detach().to(torch.float64)
    expected = torch.as_tensor(expected).detach().to(torch.float64)
    if actual.numel() == expected.numel() and actual.shape != expected.shape:
        actual = actual.reshape(expected.shape)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    if bad.any():
        idx = bad.nonzero().tolist()[:20]
        rows = [f"  {i}: got {actual[tuple(i)].item():.10g}, want {expected[tuple(i)].item():.10g}" for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} mismatching entries (atol={atol}, rtol={rtol}):\n"
                             + "\n".join(rows))


class TableLM(torch.nn.Module):
    """A causal LM whose next-token logits depend only on the current token: logits (B, T, V) = ``table[input_ids]``
    for a fixed (V, V) table — an enumerable sequence space for exact-law tests of samplers and selection rules.
    Accepts (and ignores) the cache arguments of a Hugging Face causal LM."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the sampler reads the device off the parameters

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, logits_to_keep=None,
                past_key_values=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


class CharTokenizer:
    """Token i is the character ``alphabet[i]``; token 0 is the end-of-sequence (and padding) token, dropped when
    decoding with ``skip_special_tokens``. No chat template."""

    eos_token_id = pad_token_id = 0
    chat_template = None

    def __init__(self, alphabet: str):
        self.alphabet = alphabet

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in ids if not (skip_special_tokens and i == self.eos_token_id))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.alphabet.index(ch) for ch in text]}
