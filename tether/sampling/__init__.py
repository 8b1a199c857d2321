"""Sampling completions: the batched, seeded sampler with its per-token log-probs, the lean one-token decode path
for Llama-architecture models, logits processors, and the vLLM engine for GPU machines.

* ``sampler``    — ``sample()``, ``render_prompts()``, the ``Completions`` record (with ``kl_cost``, each
  completion's summed exact KL between the processed and the model's next-token laws, and ``kl_cost_summary``);
* ``processors`` — the logits-processor hook the sampler calls at every step (top-k and top-p today; it is where
  constraints, tilting and guided decoding plug in);
* ``mixing``     — ``TeacherMixture``: a stateful processor that draws from α·teacher + (1 − α)·model (MiniLLM's
  teacher-mixed sampling), the teacher stepping its own KV cache in step with the drawn tokens;
* ``constraints`` — ``Constraint`` (JSON schema, regex, choice, Lark grammar, through llguidance) and
  ``ConstraintProcessor`` (one matcher per row, the recorded log-probs those of the constrained law; CRANE-style
  switching between delimiters), ``HFConstraintProcessor`` for ``model.generate``;
* ``exclusion``  — ``Exclude``: banned tokens and token phrases, the rest renormalised ((G)I-DLE);
* ``guidance``   — ``KLGuidedTemperature``: T = T₀·2^(−KL/h) from the KL between the laws with and without a
  grounding source (a second KV stream, ``streams.KVStream``);
* ``steering``   — activation steering (``steer``, ``Steer``) with γ calibrated to an exact-KL budget
  (``calibrate_gamma``);
* ``decode``     — ``LlamaDecoder``: one-token steps with a preallocated KV cache (tested against the model's forward);
* ``vllm``       — ``VLLMEngine`` (optional extra, CUDA machines).
"""

from tether.sampling.processors import LogitsProcessor, StatefulLogitsProcessor, TopK, TopP
from tether.sampling.sampler import Completions, render_prompts, sample

__all__ = ["Completions", "LogitsProcessor", "StatefulLogitsProcessor", "TopK", "TopP", "render_prompts", "sample"]
