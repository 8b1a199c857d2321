"""A learned reward: a Hugging Face sequence-classification model with one output.

``RewardModel(path_or_model, tokenizer=None, batch_size=8)`` scores ``(prompt, completion)`` pairs:

1. **Text.** If the tokenizer has a chat template, the pair is rendered as the conversation
   ``[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]`` with
   ``apply_chat_template(..., tokenize=False)`` and tokenized without adding special tokens again (the template
   holds them). Without a template it is encoded as a text pair ``tokenizer(prompt, completion)`` (the
   convention of encoder reward models such as the OpenAssistant DeBERTa ones).
2. **Batching.** Sequences are sorted by length, cut into batches of ``batch_size``, **right**-padded with
   ``config.pad_token_id`` and an attention mask, and scored with ``torch.inference_mode``; scores come back
   in input order. Right padding keeps positions unchanged, so a causal model's score does not depend on what
   it was batched with (tested: batched = one by one at fp32 ``atol 1e-5``).
3. **Score** = the model's single logit, read by Hugging Face at the last token that is not
   ``pad_token_id``. If your tokenizer's pad token is also a token your texts end with (pad = EOS, template
   ending in EOS), the logit is read one token earlier, exactly as during Hugging Face reward-model training.
4. **Length.** With ``max_length`` set, longer sequences keep their *last* ``max_length`` tokens (the score is
   read at the end) and are counted in ``n_truncated`` with a warning; by default nothing is truncated.

Loading from a path reads a local directory only: ``local_files_only=True`` and ``trust_remote_code=False``;
the config must have ``num_labels == 1`` and, for ``batch_size > 1``, a ``pad_token_id``. A directory that is not a
sequence classifier with a trained score head (e.g. a causal LM, whose head transformers would initialize at random)
is refused: its ``config.json`` must name a ``…ForSequenceClassification`` architecture and the checkpoint must hold
every weight of the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported on first use, so `import tether.rewards` stays light
    import torch


def _check_classifier_config(path: Path) -> None:
    """Refuse, before loading any weights, a directory whose ``config.json`` names no ``*ForSequenceClassification``
    architecture (a causal LM would load with a freshly initialized score head and score noise)."""
    import json

    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as err:
        raise ValueError(f"reward model {str(path)!r}: cannot read config.json ({err})") from None
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"reward model {str(path)!r} is a {', '.join(archs)}, not a sequence classifier with a "
                         "trained score head; give a reward model (…ForSequenceClassification, num_labels 1)")


class RewardModel:
    """Scores ``(prompt, completion)`` with a one-logit sequence classifier (see the module docstring).

    Args:
        path_or_model: a local model directory, or an already loaded ``*ForSequenceClassification`` model.
        tokenizer: required with a model object; loaded from the directory otherwise (when None).
        batch_size: sequences per forward pass.
        max_length: keep at most this many tokens per sequence (the last ones); None = no truncation.
        device, dtype: where and in what dtype to load a model given by path (default: CPU, its saved dtype).
    """

    name = "reward_model"

    def __init__(
        self,
        path_or_model: str | Path | torch.nn.Module,
        tokenizer: Any = None,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        if isinstance(path_or_model, str | Path):
            path = Path(path_or_model)
            if not path.is_dir():
                raise ValueError(f"reward model path {str(path)!r} is not a local directory")
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
            _check_classifier_config(path)
            model, info = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype,
                                                                             output_loading_info=True, **kwargs)
            if info["missing_keys"]:
                raise ValueError(f"reward model {str(path)!r}: the checkpoint has no weights for "
                                 f"{sorted(info['missing_keys'])}, so its score head would be random; give a "
                                 "trained sequence-classification reward model (num_labels 1)")
            if device is not None:
                model = model.to(device)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        else:
            model = path_or_model
            if tokenizer is None:
                raise ValueError("pass tokenizer= when path_or_model is a model object")
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels != 1:
            raise ValueError(f"a reward model must have config.num_labels == 1, got {num_labels}")
        self.pad_token_id = getattr(model.config, "pad_token_id", None)
        if self.pad_token_id is None and batch_size > 1:
            raise ValueError(
                "the reward model's config.pad_token_id is None, so it cannot score padded batches; set "
                "model.config.pad_token_id (e.g. to tokenizer.pad_token_id) or use batch_size=1"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.n_truncated = 0

    def encode(self, prompt: str, completion: str) -> list[int]:
        """Token ids of one pair (module docstring, item 1), before truncation."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            text = tok.apply_chat_template(messages, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(prompt, completion)["input_ids"]

    def score_batch(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One score per pair, in input order. Shape: ``len(prompts) == len(completions)`` scores."""
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        ids = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise ValueError(f"pairs {empty} encode to zero tokens; a reward model needs at least one token")
        if self.max_length is not None:
            long = [i for i, x in enumerate(ids) if len(x) > self.max_length]
            if long:
                self.n_truncated += len(long)
                warnings.warn(
                    f"{len(long)} of {len(ids)} reward-model inputs exceed max_length={self.max_length} tokens; "
                    "kept their last max_length tokens",
                    stacklevel=2,
                )
                for i in long:
                    ids[i] = ids[i][-self.max_length :]
        device = next(self.model.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores: list[float] = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            pad = self.pad_token_id if self.pad_token_id is not None else 0
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                attention_mask[row, : len(ids[i])] = 1
            with torch.inference_mode():
                out = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            logits = out.logits
            for row, i in enumerate(chunk):
                scores[i] = float(logits[row, 0])
        return scores

    def __call__(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float | None:
        return self.score_batch([prompt], [completion])[0]
