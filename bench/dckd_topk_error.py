"""The error of DCKD's compressed teacher store, measured: forward KL(teacher ‖ student) over the full vocabulary vs
over the teacher's top-k + remaining-mass bins (``tether.losses.distill.topk_forward_kl``, what ``tether distill``
computes with ``dckd_teacher_top_k: k``), on the first ``--rows`` rows of the shipped pairs (chosen and rejected
responses), the embedded SmolLM2-135M-Instruct as teacher and its derived student (every 2nd layer) at init.

Not a timing benchmark. The gap is exactly Σ rest_p · KL(p(·|tail) ‖ q(·|tail)) (the tails renormalized; tested in
``tests/losses/test_distill_objectives.py``), the part of the mismatch the compressed KL cannot see.

    python bench/dckd_topk_error.py [--rows 8 --k 50]      # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json

import torch

from tether.data import load_preference_dataset
from tether.losses.distill import teacher_topk, topk_forward_kl
from tether.models import derive_student, load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--train_file", default="data/ifeval_pairs_smollm2.jsonl")
    args = ap.parse_args()
    tok = load_tokenizer(None)
    teacher = load_model(None)
    student = load_model(derive_student("smollm2-135m-instruct", stride=2))
    rows, _ = load_preference_dataset(args.train_file, tok, max_length=512, max_prompt_length=256)
    exact = binned = rest = 0.0
    n = 0
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            for row in rows[:args.rows]:
                p, c = row.prompt_ids, getattr(row, f"{side}_ids")
                x = torch.tensor([p + c])
                zt = teacher(x).logits[0, len(p) - 1:-1].double()
                zs = student(x).logits[0, len(p) - 1:-1].double()
                lt, ls = zt.log_softmax(-1), zs.log_softmax(-1)
                top = teacher_topk(zt, args.k)
                exact += float((lt.exp() * (lt - ls)).sum())
                binned += float(topk_forward_kl(zs, top).sum())
                rest += float(top.rest.sum())
                n += len(c)
    out = {"tokens": n, "k": args.k, "exact_kl": exact / n, "binned_kl": binned / n, "gap": (exact - binned) / n,
           "gap_share": (exact - binned) / exact, "teacher_mass_outside_top_k": rest / n}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
