"""One-token decode steps for Llama-architecture models, written for small batches on CPU.

During sampling each step runs one token per row through every layer. On a CPU with a 16-row batch the step is
dominated by matrix products with 16 rows, where ``nn.Linear``'s ``x @ W.T`` runs far below the machine's peak
(the BLAS packs the large weight every call). :class:`LlamaDecoder` computes the same step with

* the weight on the left, ``W @ x.T`` (the BLAS packs the small activation instead): ≈1.3× faster per product on
  the 2-core CPU this library is developed on, at M = 16;
* on CPU, a row count of 16k + 11 … 16k + 15 padded with zero rows to 16(k + 1): there the BLAS's products with
  such counts take ~1.5× as long as with the next multiple of 16 (measured for SmolLM2's shapes, 2 threads), which
  matters once finished rows have left the batch;
* a preallocated key/value cache written in place (no concatenation per step), rows dropped with one gather when
  they finish;
* no per-step Python objects beyond tensors (no cache classes, masks rebuilt, or output records).

It is the optimized twin of the Hugging Face forward: ``tests/test_decode.py`` checks that its logits match the
model's own forward with a ``DynamicCache`` at fp32 (max abs error ≤ 1e-4 on logits of O(1), a few float
rounding steps), and that greedy decoding picks the same tokens. The prefill (the prompt) runs through the model's
own forward; only the one-token steps run here.

Supported: ``LlamaForCausalLM`` with silu MLP, no attention/MLP biases, default RoPE (SmolLM2, Llama-style
models). :func:`supports` says whether a model qualifies; callers fall back to the model's forward otherwise
(LoRA-wrapped models, other architectures, other RoPE scalings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LlamaDecoder", "supports"]


def supports(model) -> bool:
    """True when ``model`` is a plain (un-wrapped) Llama causal LM this module computes exactly. A model with forward
    hooks on any module (activation steering, ``tether.sampling.steering.steer``) is not: the decoder computes the
    layers itself and would skip them."""
    cfg = getattr(model, "config", None)
    if cfg is None or type(model).__name__ != "LlamaForCausalLM":
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return (getattr(cfg, "hidden_act", "silu") == "silu" and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False) and rope.get("rope_type", "default") == "default"
            and getattr(cfg, "pretraining_tp", 1) == 1)


class LlamaDecoder:
    """Decode steps for ``model`` (see the module docstring), continuing from a prefilled ``DynamicCache``.

    The decoder holds the model's own weight tensors (no copies), so in-place updates of the model are seen.

    Args:
        model: a model for which :func:`supports` is True.
    """

    def __init__(self, model):
        if not supports(model):
            raise ValueError(f"LlamaDecoder: {type(model).__name__} is not a plain LlamaForCausalLM with silu MLP, "
                             "no biases and default RoPE; sample through the model's forward instead")
        cfg = model.config
        inner = model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight
            self.layers = [(layer.input_layernorm.weight, layer.self_attn.q_proj.weight,
                            layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight,
                            layer.post_attention_layernorm.weight, layer.mlp.gate_proj.weight,
                            layer.mlp.up_proj.weight, layer.mlp.down_proj.weight) for layer in inner.layers]
            self.norm = inner.norm.weight
            self.head = model.get_output_embeddings().weight
            rotary = inner.rotary_emb
            self.inv_freq = rotary.inv_freq.float()
            self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.key_ok = torch.zeros(0, 0, dtype=torch.bool)
        self.length = 0

    # -- cache -----------------------------------------------------------------------------------------------

    def start(self, cache, attention_mask: torch.Tensor, max_new_tokens: int) -> None:
        """Take over a prefilled Hugging Face cache (rows × prompt width) with room for ``max_new_tokens`` more;
        ``attention_mask`` (rows, width) marks the real (non-padding) prompt positions."""
        rows, width = attention_mask.shape
        capacity = width + max_new_tokens
        self.k_cache, self.v_cache = [], []
        for layer in cache.layers:
            for store, src in ((self.k_cache, layer.keys), (self.v_cache, layer.values)):
                buf = src.new_empty(rows, self.n_kv, capacity, self.head_dim)
                buf[:, :, :width] = src
                store.append(buf)
        self.key_ok = torch.zeros(rows, capacity, dtype=torch.bool, device=attention_mask.device)
        self.key_ok[:, :width] = attention_mask.bool()
        self.length = width

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (indices into the current batch), in that order."""
        self.k_cache = [k.index_select(0, rows) for k in self.k_cache]
        self.v_cache = [v.index_select(0, rows) for v in self.v_cache]
        self.key_ok = self.key_ok.index_select(0, rows)

    # -- one step --------------------------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.rope_scale, emb.sin() * self.rope_scale

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @staticmethod
    def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` computed as ``(weight @ x.T).T``, zero rows added up to the next multiple of 16 when the
        row count is 11-15 past one (see the module docstring)."""
        rows = x.shape[0]
        if x.device.type == "cpu" and rows % 16 > 10:
            x = torch.cat([x, x.new_zeros(-rows % 16, x.shape[1])])
        return torch.mm(weight, x.t()).t()[:rows]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(rows,) next tokens at (rows,) RoPE positions → (rows, vocab) fp32 logits of the token after them."""
        rows = tokens.shape[0]
        slot = self.length
        self.key_ok[:, slot] = True
        cos, sin = self._rope(positions)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q_dim = self.n_heads * self.head_dim
        # Additive mask over the cached keys (padding of left-padded prompts → -inf), shared by all layers.
        bias = torch.zeros(self.key_ok[:, :slot + 1].shape, dtype=self.embed.dtype, device=tokens.device)
        bias = bias.masked_fill_(~self.key_ok[:, :slot + 1], float("-inf"))[:, None, None, :]
        groups = self.n_heads // self.n_kv
        scale = self.head_dim ** -0.5
        h = self.embed.index_select(0, tokens)
        for (ln1, q_w, k_w, v_w, o_w, ln2, gate_w, up_w, down_w), k_buf, v_buf in zip(self.layers, self.k_cache,
                                                                                       self.v_cache):
            a = self._rms(h, ln1)
            q = self._linear(a, q_w).reshape(rows, self.n_heads, self.head_dim)
            k = self._linear(a, k_w).reshape(rows, self.n_kv, self.head_dim)
            v = self._linear(a, v_w).reshape(rows, self.n_kv, self.head_dim)
            k_buf[:, :, slot] = self._rotate(k, cos, sin)
            v_buf[:, :, slot] = v
            # Grouped-query attention of one query per head: the heads sharing a key/value head attend together.
            q = (self._rotate(q, cos, sin) * scale).reshape(rows, self.n_kv, groups, self.head_dim)
            scores = torch.matmul(q, k_buf[:, :, :slot + 1].transpose(-1, -2)) + bias
            att = torch.matmul(scores.softmax(-1), v_buf[:, :, :slot + 1])
            h = h + self._linear(att.reshape(rows, q_dim), o_w)
            m = self._rms(h, ln2)
            h = h + self._linear(F.silu(self._linear(m, gate_w)) * self._linear(m, up_w), down_w)
        self.length = slot + 1
        return self._linear(self._rms(h, self.norm), self.head)
