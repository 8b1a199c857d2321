"""vLLM rollouts for GPU machines, returning the same :class:`tether.sampling.Completions` as ``sample``.

    engine = VLLMEngine("runs/rl/start", seed=0)      # one per run: vLLM keeps its own copy of the weights
    done = engine.sample(prompt_ids, n=8, max_new_tokens=256, temperature=1.0)
    ...                                                # optimizer steps on the trained policy
    engine.sync_weights(policy)                        # push the new weights before the next rollout

vLLM is an optional extra for CUDA machines (``pip install "tether[vllm]"``); without it, constructing an engine
raises one clear ``ImportError`` that says what to do instead. The online recipe selects it with
``engine: vllm``.

Weights are pushed in place with the loaded model's ``load_weights`` (vLLM's own loader, which maps Hugging Face
parameter names and fuses projections), through ``LLM.apply_model`` where vLLM has it (with a multi-process
engine the weights are serialised to the worker); the prefix cache is reset afterwards so no stale key/values are
reused. This path has not been run against a real vLLM in tether's CI or on its GPU checks (vLLM could not be
installed there); ``tests/test_sampling_vllm.py`` checks tether's side with a stand-in engine.
With LoRA, the adapters are merged into a copy of each weight before it is sent (vLLM sees a plain model).

Log-probs: vLLM reports the sampled token's log-prob as its ``logprobs_mode`` defines it (by default the model's
raw distribution, before temperature). tether's online recipe recomputes the behaviour log-probs with the policy
in its scoring pass and only compares against these (``sampler_logp_gap``), so this convention never changes the
gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

from tether.sampling.sampler import Completions

__all__ = ["VLLMEngine", "require_vllm"]

MISSING_VLLM = ("engine='vllm' needs the vllm package, which runs on CUDA GPUs: install it with "
                "`pip install \"tether[vllm]\"` on a GPU machine, or use engine='tether' (the default, any device)")


def require_vllm():
    """Import and return the ``vllm`` module, or raise ``ImportError`` with an actionable one-line message."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(MISSING_VLLM) from err
    return vllm


class VLLMEngine:
    """A vLLM ``LLM`` over a local Hugging Face model directory (the starting policy, saved once).

    Args:
        model_dir: the directory vLLM loads the architecture, tokenizer and first weights from.
        seed: vLLM's global seed; each ``sample`` call also passes a per-request seed.
        gpu_memory_utilization: fraction of GPU memory vLLM may reserve (leave room for training).
        max_model_len: longest prompt + completion, in tokens.
    """

    def __init__(self, model_dir: str, *, seed: int = 0, gpu_memory_utilization: float = 0.3,
                 max_model_len: int = 2048):
        vllm = require_vllm()
        self._vllm = vllm
        self.llm = vllm.LLM(model=str(model_dir), seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, trust_remote_code=False)
        self.tokenizer = self.llm.get_tokenizer()

    def sync_weights(self, model) -> None:
        """Copy the trained policy's weights into vLLM's model (LoRA merged), then drop the prefix cache."""
        weights = list(_plain_state_dict(model).items())
        if hasattr(self.llm, "apply_model"):  # vLLM ≥ 0.9: runs the function on the model in every worker
            self.llm.apply_model(lambda runner_model: runner_model.load_weights(weights))
        else:  # older in-process engines
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()

    def sample(self, prompt_ids: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int = 64,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_strings: Sequence[str] = (),
               seed: int = 0) -> Completions:
        """``n`` completions per prompt, grouped by prompt, as :func:`tether.sampling.sample` returns them."""
        params = self._vllm.SamplingParams(
            n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
            stop=list(stop_strings) or None, include_stop_str_in_output=True, logprobs=0, seed=seed)
        requests = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        done = Completions()
        eos = self.tokenizer.eos_token_id
        for i, (prompt, request) in enumerate(zip(prompt_ids, outputs)):
            for out in request.outputs:
                ids = list(out.token_ids)
                logps = [step[tok].logprob for step, tok in zip(out.logprobs or [], ids)]
                done.prompt_index.append(i)
                done.prompt_ids.append(list(prompt))
                done.completion_ids.append(ids)
                done.logprobs.append(logps)
                done.texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
                done.finished.append(out.finish_reason == "stop" or (bool(ids) and ids[-1] == eos))
        return done


def _plain_state_dict(model) -> dict:
    """Parameter name → tensor of a plain (non-LoRA) model; a peft model's adapters are merged into copies."""
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}
