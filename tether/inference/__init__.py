"""Inference-time alignment: draw N completions from the base policy π_ref, keep one, and say how far that moved.

Nothing here changes weights. Every method reads N i.i.d. candidates per prompt (one batched sampling call,
``candidates``), scores them with any tether reward, keeps one, and reports the kept completion's reward, its win
rate against independent base draws, the effective sample size of the selection, and KL(π_method ‖ π_ref) — each
KL figure labelled as exact, an estimate, a bound or a plug-in, with how it was obtained (``accounting``).

* ``laws``       — exact output laws on an enumerated outcome space (best-/worst-of-N with ties, soft best-of-N,
  rejection, the tilted optimum π* ∝ π_ref·exp(r/β)), KL, TV, win rate, and Beirami et al.'s KL estimator and bound;
* ``select``     — the selection rules on (prompts, N) scores: best-of-N, worst-of-N, soft best-of-N, tilted
  (self-normalized importance) resampling, rejection sampling;
* ``candidates`` — ``draw_candidates``: N candidates plus M base draws per prompt, scored, with sequence log-probs;
* ``accounting`` — the KL figures, effective sample size and win rate;
* ``methods``    — ``METHODS``: each method by name over candidates, returning a ``MethodResult``;
* ``transforms`` — calibration against reference samples, InfAlign's CTRL transforms, the vBoN reward, and
  ``ReferenceCalibration`` (the reward transform of ``tether rl``);
* ``ensemble``   — reward-model ensembles (mean, min, mean − λ·std, UWO);
* ``qprobe``     — Q-probe: a linear value head on the model's embeddings, trained from rewards or preferences.

The command is ``tether sample`` (``tether.recipes.sample``).
"""

from tether.inference.accounting import KLFigure
from tether.inference.candidates import Candidates, draw_candidates
from tether.inference.ensemble import EnsembleReward, ensemble
from tether.inference.methods import METHODS, MethodResult
from tether.inference.qprobe import QProbe, completion_features, fit_qprobe_preferences, fit_qprobe_rewards
from tether.inference.select import (
    Selection,
    best_of_n,
    rejection_sampling,
    soft_best_of_n,
    tilted_resampling,
    worst_of_n,
)
from tether.inference.transforms import REWARD_TRANSFORMS, ReferenceCalibration, calibrate

__all__ = ["METHODS", "REWARD_TRANSFORMS", "Candidates", "EnsembleReward", "KLFigure", "MethodResult", "QProbe",
           "ReferenceCalibration", "Selection", "best_of_n", "calibrate", "completion_features", "draw_candidates",
           "ensemble", "fit_qprobe_preferences", "fit_qprobe_rewards", "rejection_sampling", "soft_best_of_n",
           "tilted_resampling", "worst_of_n"]
