"""The KL cost of sampling-time interventions on the embedded SmolLM2 (not a timing benchmark).

    python bench/interventions_kl.py                      # ~2 min on 2 idle cores; bench/results/interventions_kl.json
    python bench/interventions_kl.py --prompts 2 --n 2 --max-new-tokens 8   # smoke

Three interventions, each through ``tether.sampling.sample``'s processor hook, each with ``Completions.kl_cost``
(per completion Σ_t KL(q_t ‖ p_t), processed vs the model's own law at the sampling temperature) summarized as a
mean with a 95% CI over prompts (``kl_cost_summary``):

1. token exclusion ((G)I-DLE): " the" / "the" / "The" banned; checks no completion contains the banned token
   sequences, and counts how often the ban removed mass;
2. KL-guided temperature (Chang et al. 2023): each prompt asks a question about a short passage; the source-free
   stream gets the question alone; reports the mean per-step temperature and the share of steps below T₀/2;
3. activation steering (ASC): a mean-difference vector at the middle layer from short-vs-long answer pairs, γ
   calibrated to a mean token-KL budget on calibration texts, then sampling through ``Steer``; reports γ, the
   measured calibration KL, the monotonicity check, the sampled KL cost and the mean completion length steered
   vs unsteered (same seed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tether.models import load_model, load_tokenizer
from tether.sampling import render_prompts, sample
from tether.sampling.exclusion import Exclude
from tether.sampling.guidance import KLGuidedTemperature
from tether.sampling.sampler import kl_cost_summary
from tether.sampling.steering import Steer, calibrate_gamma, decoder_layers, mean_difference_vector

PASSAGES = [
    ("The Amazon river carries more water than any other river; its basin covers about seven million square "
     "kilometres across nine countries.", "How large is the Amazon basin?"),
    ("Marie Curie won two Nobel prizes, in physics in 1903 and in chemistry in 1911, the first person to do so.",
     "In which years did Marie Curie win her Nobel prizes?"),
    ("The Python language was released by Guido van Rossum in 1991 and is named after a comedy group.",
     "Who created Python and when?"),
    ("Mount Kilimanjaro in Tanzania rises to 5,895 metres and is the highest mountain in Africa.",
     "How high is Kilimanjaro?"),
]
QUESTIONS = ["Why is the sky blue?", "Give me a tip for learning to cook.", "What is a prime number?",
             "How do plants make food?"]
SHORT = ["Rayleigh scattering.", "Start simple.", "Divisible only by 1 and itself.", "Photosynthesis."]
LONG = ["Well, let me explain this carefully and in detail, step by step, because there are many aspects to consider "
        "and it is worth going through each of them thoroughly before concluding anything at all.",
        "There are many things to say here, so let me walk through them one at a time, in detail, with examples, "
        "caveats, and a long discussion of each of the considerations involved before answering.",
        "To answer this properly I will first go over the background, then the definitions, then several examples, "
        "and finally a longer discussion of the subtleties that people often miss.",
        "This is a big topic, so I will explain it at length, covering the history, the mechanisms, the exceptions, "
        "and the many details that matter, step by step and very thoroughly."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--bandwidth", type=float, default=1.0)
    ap.add_argument("--budget", type=float, default=0.1, help="mean token KL budget of the steering (nats)")
    ap.add_argument("--out", default="bench/results/interventions_kl.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    tok, model = load_tokenizer("smollm2-135m-instruct"), load_model("smollm2-135m-instruct").eval()
    P, n, T, L = args.prompts, args.n, args.temperature, args.max_new_tokens
    common = dict(n=n, max_new_tokens=L, temperature=T, seed=0, batch_size=16)
    report: dict = {"args": vars(args)}

    # 1. exclusion
    prompts = render_prompts(tok, QUESTIONS[:P])
    ex = Exclude.from_strings(tok, phrases=["the", "The"])
    done = sample(model, tok, prompts, processors=[ex], **common)
    banned = [list(p) for prefix in ex.follow for p in [(*prefix, t) for t in ex.follow[prefix]]]
    banned += [[t] for t in ex.tokens]
    hits = sum(any(ids[i:i + len(b)] == b for b in banned for i in range(len(ids))) for ids in done.completion_ids)
    report["exclusion"] = {**kl_cost_summary(done), "banned_sequences": banned, "completions_with_banned": hits,
                           "banned_steps": ex.removed, "mean_banned_mass": ex.removed_mass / max(ex.removed, 1),
                           "tokens": sum(map(len, done.completion_ids))}
    print("exclusion", report["exclusion"])

    # 2. KL-guided temperature
    with_src = render_prompts(tok, [f"{p}\n\n{q}" for p, q in PASSAGES[:P]])
    without = render_prompts(tok, [q for _, q in PASSAGES[:P]])
    guided = KLGuidedTemperature(model, without, n=n, temperature=T, bandwidth=args.bandwidth, max_new_tokens=L)
    done = sample(model, tok, with_src, processors=[guided], **common)
    temps = [t for ts in guided.temperatures.values() for t in ts]
    report["kl_guided_temperature"] = {**kl_cost_summary(done), "mean_temperature": sum(temps) / len(temps),
                                       "share_below_half": sum(t < T / 2 for t in temps) / len(temps),
                                       "mean_guide_kl": sum(k for ks in guided.guide_kl.values() for k in ks)
                                       / len(temps), "steps": len(temps)}
    print("kl-guided temperature", report["kl_guided_temperature"])

    # 3. steering
    layer = len(decoder_layers(model)) // 2
    pairs = [(render_prompts(tok, [q])[0] + tok(s, add_special_tokens=False)["input_ids"],
              render_prompts(tok, [q])[0] + tok(lg, add_special_tokens=False)["input_ids"])
             for q, s, lg in zip(QUESTIONS, SHORT, LONG)]
    v = mean_difference_vector(model, layer, [a for a, _ in pairs], [b for _, b in pairs])
    calib = render_prompts(tok, [q for _, q in PASSAGES])
    cal = calibrate_gamma(model, calib, layer, v, args.budget, gamma_start=0.25, rel_tol=1e-2)
    plain = sample(model, tok, prompts, **common)
    done = sample(model, tok, prompts, processors=[Steer(model, prompts, n=n, layer=layer, vector=v, gamma=cal.gamma,
                                                         temperature=T)], **common)
    report["steering"] = {**kl_cost_summary(done), "layer": layer, "vector_norm": float(v.norm()),
                          "gamma": cal.gamma, "calibration_kl": cal.kl, "budget": cal.budget,
                          "monotone": cal.monotone, "evaluations": len(cal.evaluations),
                          "mean_tokens_steered": sum(map(len, done.completion_ids)) / len(done.completion_ids),
                          "mean_tokens_plain": sum(map(len, plain.completion_ids)) / len(plain.completion_ids),
                          "sampled_tokens": sum(map(len, done.completion_ids))}
    print("steering", report["steering"])
    report["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
