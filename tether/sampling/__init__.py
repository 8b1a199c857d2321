"""Sampling completions: the batched, seeded sampler with its per-token log-probs, the lean one-token decode path
for Llama-architecture models, logits processors, and the vLLM engine for GPU machines.

* ``sampler``    — ``sample()``, ``render_prompts()``, the ``Completions`` record;
* ``processors`` — the logits-processor hook the sampler calls at every step (top-k and top-p today; it is where
  constraints, tilting and guided decoding plug in);
* ``mixing``     — ``TeacherMixture``: a stateful processor that draws from α·teacher + (1 − α)·model (MiniLLM's
  teacher-mixed sampling), the teacher stepping its own KV cache in step with the drawn tokens;
* ``decode``     — ``LlamaDecoder``: one-token steps with a preallocated KV cache (tested against the model's forward);
* ``vllm``       — ``VLLMEngine`` (optional extra, CUDA machines).
"""

from tether.sampling.processors import LogitsProcessor, StatefulLogitsProcessor, TopK, TopP
from tether.sampling.sampler import Completions, render_prompts, sample

__all__ = ["Completions", "LogitsProcessor", "StatefulLogitsProcessor", "TopK", "TopP", "render_prompts", "sample"]
