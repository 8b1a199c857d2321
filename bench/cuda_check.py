"""CUDA correctness of tether's optimized paths, and GPU throughput of its sampler, for machines with a GPU.

    python bench/cuda_check.py --out bench/results/cuda_check.json      # ≈ 3 min on one H100/H200

The unit tests run on CPU; this script repeats their oracles on ``cuda`` (fp32, TF32 off):

1. ``tether.sampling.decode.LlamaDecoder`` against the model's own forward with a ``DynamicCache`` (logits, row
   dropping);
2. ``token_stats`` (chunked LM head, custom backward) against ``token_stats_plain`` — values and gradients;
3. ``shared_prefix_hidden_states`` against ``hidden_states`` — values and parameter gradients;
4. ``sample``: same seed → same completions, greedy = ``model.generate``, sampler log-probs = teacher forcing;
5. the online-RL recipe on ``device: cuda`` (tiny model): an uninterrupted run and a stop + resume give the same
   metrics; ``engine: vllm`` without vLLM installed raises the one-line ImportError; the preference recipe (DPO
   with cached reference log-probs, TDPO-2 with the online reference) gives the CPU run's metrics;
6. throughput on a randomly initialised model of SmolLM2-135M's shape (no weights are downloaded): tether's
   sampler vs ``model.generate``, 16 and 64 rows × 48 new tokens, interleaved, medians.

Each check records its worst error and its tolerance; the script exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

DEV = "cuda"
RESULTS: dict = {"checks": {}}


def record(name: str, error: float, tol: float, **extra) -> None:
    ok = bool(error <= tol)
    RESULTS["checks"][name] = {"max_abs_error": error, "tolerance": tol, "ok": ok, **extra}
    print(f"{'ok ' if ok else 'FAIL'} {name}: {error:.3g} (tol {tol:g}) {extra or ''}", flush=True)


def check_decoder() -> None:
    from test_decode import left_padded, odd_llama
    from transformers import DynamicCache

    from tether.sampling.decode import LlamaDecoder

    model = odd_llama(seed=1).to(DEV)
    ids, mask = left_padded([[5, 9, 14, 2, 7, 7, 30, 1, 99], [3], [8, 8, 8, 8], [60, 61, 62, 63, 64, 65]], pad=0)
    ids, mask = ids.to(DEV), mask.to(DEV)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = []
    with torch.no_grad():
        for _ in range(2):
            cache = DynamicCache()
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, past_key_values=cache)
            caches.append(cache)
    ref_cache, cache = caches
    decoder = LlamaDecoder(model)
    decoder.start(cache, mask, max_new_tokens=8)
    pos, ref_mask, worst = positions[:, -1] + 1, mask, 0.0
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        tokens = torch.randint(0, 101, (len(pos),), generator=gen).to(DEV)
        if step == 3:
            keep = torch.tensor([3, 0], device=DEV)
            ref_cache.batch_select_indices(keep)
            decoder.keep(keep)
            tokens, pos, ref_mask = tokens[keep], pos[keep], ref_mask[keep]
        ref_mask = torch.cat([ref_mask, ref_mask.new_ones(len(pos), 1)], dim=1)
        with torch.no_grad():
            ref = model(input_ids=tokens[:, None], attention_mask=ref_mask, position_ids=pos[:, None],
                        use_cache=True, past_key_values=ref_cache).logits[:, -1]
        worst = max(worst, float((decoder.step(tokens, pos) - ref).abs().max()))
        pos = pos + 1
    record("decoder_logits_vs_model_forward", worst, 1e-4)


def check_token_stats() -> None:
    from tether.logprobs import IGNORE_INDEX, token_stats, token_stats_plain

    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 47, 31, 123
    hidden = torch.randn(B, T, H, generator=g).to(DEV).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).to(DEV).requires_grad_()
    ref_hidden, ref_weight = torch.randn(B, T, H, generator=g).to(DEV), (torch.randn(V, H, generator=g) * 0.3).to(DEV)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = IGNORE_INDEX
    labels = labels.to(DEV)
    stats = ("logps", "kl", "entropy", "ref_logps")
    upstream = {s: torch.randn(B, T, generator=g).to(DEV) for s in stats}
    results = []
    for chunked in (True, False):
        if chunked:
            out = token_stats(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, stats=stats,
                              chunk_size=16, temperature=0.7)
        else:
            logits = hidden @ weight.T
            out = token_stats_plain(logits, labels, ref_logits=ref_hidden @ ref_weight.T, stats=stats,
                                    temperature=0.7)
        loss = sum((out[s] * upstream[s]).sum() for s in stats if out[s].requires_grad)
        grads = torch.autograd.grad(loss, (hidden, weight))
        results.append(([out[s].detach() for s in stats], grads))
    (v1, g1), (v2, g2) = results
    record("token_stats_values_vs_plain", max(float((a - b).abs().max()) for a, b in zip(v1, v2)), 1e-5)
    record("token_stats_grads_vs_plain", max(float((a - b).abs().max()) for a, b in zip(g1, g2)), 1e-5)


def check_prefix() -> None:
    from test_prefix import batch

    from tether.logprobs import hidden_states
    from tether.prefix import shared_prefix_hidden_states
    from tether.testing import tiny_model

    model = tiny_model(seed=3).to(DEV).train()
    ids, mask, prompt_len, group = (t.to(DEV) for t in batch([[1, 2, 3, 4, 5], [9, 8]],
                                                             [[[7, 7], [6], [5, 4, 3]], [[1, 1, 1, 1], [2]]]))
    params = list(model.parameters())
    plain = hidden_states(model, ids, mask)
    shared = shared_prefix_hidden_states(model, ids, mask, prompt_len, group)
    keep = mask.bool()
    weights = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1)).to(DEV) * keep[..., None]
    g_plain = torch.autograd.grad((plain * weights).sum(), params)
    g_shared = torch.autograd.grad((shared * weights).sum(), params)
    record("shared_prefix_values_vs_plain", float((shared[keep] - plain[keep]).abs().max()), 1e-5)
    record("shared_prefix_grads_vs_plain",
           max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(g_shared, g_plain)), 1e-5,
           measure="max abs error / max abs gradient, per parameter")


def check_sampling() -> None:
    from tether.logprobs import IGNORE_INDEX, hidden_states, lm_head, token_stats
    from tether.sampling import render_prompts, sample
    from tether.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), seed=5).to(DEV)
    prompts = render_prompts(tok, ["hi", "a much longer prompt here", [{"role": "user", "content": "x"}]])
    a = sample(model, tok, prompts, n=4, max_new_tokens=9, temperature=1.0, seed=3, batch_size=5)
    b = sample(model, tok, prompts, n=4, max_new_tokens=9, temperature=1.0, seed=3, batch_size=5)
    record("sampling_same_seed_same_completions", float(a.completion_ids != b.completion_ids), 0.0,
           completions=len(a.completion_ids))
    greedy = sample(model, tok, prompts, n=2, max_new_tokens=12, temperature=0.0, batch_size=4)
    mismatches = 0
    for i, completion in zip(greedy.prompt_index, greedy.completion_ids):
        ids = torch.tensor([prompts[i]], device=DEV)
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        mismatches += completion != ref
    record("sampling_greedy_vs_generate_mismatches", float(mismatches), 0.0)
    weight, bias = lm_head(model)
    worst = 0.0
    for p, c, lp in zip(a.prompt_ids, a.completion_ids, a.logprobs):
        ids = torch.tensor([p + c], device=DEV)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[0, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c, device=DEV)
        with torch.no_grad():
            ref = token_stats(hidden_states(model, ids, torch.ones_like(ids)), weight, labels,
                              bias=bias)["logps"][labels != IGNORE_INDEX]
        worst = max(worst, float((ref.cpu() - torch.tensor(lp)).abs().max()))
    record("sampler_logprobs_vs_teacher_forcing", worst, 1e-4)


def check_recipe(workdir: Path) -> None:
    from test_recipe_online_rl import trajectory, vowel_share

    from tether.recipes.online_rl import RLConfig, train
    from tether.testing import make_tiny_model_dir

    model_dir = str(make_tiny_model_dir(workdir / "m", seed=0))

    def cfg(out: str, **kw) -> RLConfig:
        values = dict(output_dir=str(workdir / out), model=model_dir, steps=4, prompts_per_step=2, group_size=4,
                      max_new_tokens=10, train_prompts=8, eval_prompts=4, progress=False, tensorboard=False,
                      lr=3e-3, micro_batch_size=8, device=DEV, ppo_epochs=2, mini_batches=2, kl_estimator="k2",
                      target_kl=0.001, save_every=1)
        values.update(kw)
        return RLConfig(**values)

    t0 = time.perf_counter()
    full = train(cfg("full"), reward=vowel_share)
    train(cfg("part", stop_after=2), reward=vowel_share)
    resumed = train(cfg("part", resume=True), reward=vowel_share)
    worst = 0.0
    for ra, rb in zip(trajectory(full.metrics), trajectory(resumed.metrics)):
        worst = max(worst, max(abs(ra[k] - rb[k]) for k in ra if isinstance(ra[k], (int, float))))
    record("rl_recipe_resume_vs_uninterrupted", worst, 1e-6, steps=len(full.metrics),
           seconds=round(time.perf_counter() - t0, 1),
           token_kl=[round(r["token_kl"], 6) for r in full.metrics if "token_kl" in r])
    try:
        train(cfg("vllm", engine="vllm", steps=1), reward=vowel_share)
        message = "no error: vllm is installed here"
    except ImportError as err:
        message = str(err)
    RESULTS["vllm_engine_without_vllm"] = message
    print("vllm:", message, flush=True)


def check_preference_recipe(workdir: Path) -> None:
    """DPO (cached reference log-probs) and TDPO-2 (online full-vocabulary reference) on ``device`` vs the same run
    on the CPU: no sampling is involved, so every logged metric must agree to float rounding."""
    from test_recipe_preference import QUIET, ROWS, _write_jsonl

    from tether.recipes.preference import PreferenceConfig, train
    from tether.testing import make_tiny_model_dir

    model_dir = str(make_tiny_model_dir(workdir / "pm", seed=0))
    pairs = str(_write_jsonl(workdir / "pairs.jsonl", ROWS))
    for loss in ("dpo", "tdpo2"):
        runs = []
        for device in ("cpu", DEV):
            cfg = PreferenceConfig(train_file=pairs, model=model_dir, output_dir=str(workdir / f"{loss}-{device}"),
                                   loss=loss, batch_size=3, grad_accum=2, epochs=1, lr=1e-3, device=device, **QUIET)
            runs.append(train(cfg).metrics)
        worst = max(abs(a[k] - b[k]) / max(1.0, abs(a[k])) for a, b in zip(*runs) for k in a
                    if k not in ("step", "tokens") and isinstance(a[k], float))
        record(f"preference_recipe_{loss}_device_vs_cpu", worst, 1e-4, steps=len(runs[0]),
               measure="max |device − cpu| / max(1, |cpu|) over every logged metric")


def timing() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.sampling import sample

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
                                                                                     "rope_theta": 100000.0})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEV).eval()

    class Tok:  # the sampler needs an eos id and decode(); a random model never says eos on purpose
        eos_token_id, pad_token_id = 2, 2

        def decode(self, ids, skip_special_tokens=True):
            return ""

    tok = Tok()
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    prompts = [list(range(100 + 7 * i, 180 + 7 * i)) for i in range(8)]
    out = {}
    for n_prompts in (2, 8):
        rows = n_prompts * 8
        ids = torch.tensor([p for p in prompts[:n_prompts] for _ in range(8)], device=DEV)

        def ours(n_prompts=n_prompts, rows=rows):
            sample(model, tok, prompts[:n_prompts], n=8, max_new_tokens=48, temperature=1.0, seed=1, batch_size=rows)

        def generate(ids=ids):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                           temperature=1.0, max_new_tokens=48, min_new_tokens=48, eos_token_id=None,
                           pad_token_id=2)

        times = {"tether": [], "generate": []}
        for fn in (ours, generate):
            fn()
        for _ in range(5):
            for name, fn in (("tether", ours), ("generate", generate)):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"{rows}_rows"] = {"median_seconds": med, "generate_over_tether": med["generate"] / med["tether"]}
        print(f"{rows} rows × 48 tokens: tether {med['tether']:.3f} s, generate {med['generate']:.3f} s", flush=True)
    RESULTS["sampler_timing_smollm2_shape_random_weights"] = out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/cuda_check.json")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--device", default="cuda", help="'cpu' runs the same checks here (a smoke test)")
    args = parser.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_check: no CUDA device here")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import transformers

    RESULTS["meta"] = {"device": torch.cuda.get_device_name() if DEV == "cuda" else platform.processor(),
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "python": platform.python_version()}
    print(RESULTS["meta"], flush=True)
    check_decoder()
    check_token_stats()
    check_prefix()
    check_sampling()
    with tempfile.TemporaryDirectory() as tmp:
        check_recipe(Path(tmp))
        check_preference_recipe(Path(tmp))
    if not args.no_timing:
        timing()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(RESULTS, indent=2))
    failed = [k for k, v in RESULTS["checks"].items() if not v["ok"]]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
