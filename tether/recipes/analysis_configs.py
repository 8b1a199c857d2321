"""The typed configs of the commands that train no model of their own: they measure, sample from, sweep over and
combine models — ``tether kl``, ``tether sample``, ``tether frontier``, ``tether merge``, ``tether diagnose``.

The conventions are those of ``tether.recipes.configs`` (the training recipes' configs): flat dataclasses, the
documentation of each field written beside it (``tether <command> --help`` prints it), every value checked in
``__post_init__`` with a message that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tether.config import check_range
from tether.recipes.configs import check_reward_names

__all__ = ["DiagnoseConfig", "FrontierConfig", "KLConfig", "MergeConfig", "SampleConfig", "SAMPLE_METHODS"]


@dataclass
class KLConfig:
    """Measure how far a policy moved from a reference: `tether kl --policy DIR --prompts_file FILE`."""

    policy: str = ""
    """The trained model directory."""
    reference: str = "smollm2-135m-instruct"
    """The reference model: the embedded model or a local directory."""
    prompts_file: str = ""
    """Held-out prompts: JSONL/Parquet/datasets with a 'prompt' field."""
    samples_per_prompt: int = 4
    """Completions sampled from the policy per prompt (temperature 1)."""
    max_new_tokens: int = 64
    """Length limit of each completion."""
    seed: int = 0
    """Sampling seed."""
    output: str | None = None
    """Write the JSON report here."""
    device: str = "cpu"
    """Where both models run ('cpu' or 'cuda')."""

    def __post_init__(self) -> None:
        check_range("samples_per_prompt", self.samples_per_prompt, self.samples_per_prompt >= 1, "tether kl")
        check_range("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "tether kl")


SAMPLE_METHODS = ("plain", "best_of_n", "worst_of_n", "soft_best_of_n", "tilted", "rejection", "qprobe")


@dataclass
class SampleConfig:
    """Inference-time alignment with the KL of every method to the base policy: `tether sample --config x.yaml`."""

    model: str = "smollm2-135m-instruct"
    """The base policy π_ref: the embedded model or a local Hugging Face model directory."""
    prompts_file: str = "data/ifeval_heldout_prompts.jsonl"
    """Prompt rows (JSONL/Parquet/datasets) with 'prompt' plus what the rewards read (e.g. 'constraints')."""
    output_dir: str = "runs/sample"
    """Where candidates.jsonl, samples.jsonl, sample_report.json (and a trained qprobe.pt) go."""
    methods: list[Literal["plain", "best_of_n", "worst_of_n", "soft_best_of_n", "tilted", "rejection", "qprobe"]] = \
        field(default_factory=lambda: ["best_of_n"])
    """Methods to run, each on the same candidates: plain, best_of_n, worst_of_n, soft_best_of_n (keep with
    probability ∝ exp(r/τ)), tilted (importance resampling toward π_ref·exp(r/β)), rejection (toward the same π*),
    qprobe (∝ exp(Q/τ) with a linear probe)."""
    n: list[int] = field(default_factory=lambda: [8])
    """Candidates per prompt; every method runs at each n on the first n of max(n) candidates drawn once."""
    tau: list[float] = field(default_factory=lambda: [0.1])
    """Temperatures of soft_best_of_n and qprobe (0 = argmax)."""
    beta: list[float] = field(default_factory=lambda: [0.1])
    """KL coefficients β of tilted and rejection (target π* ∝ π_ref·exp(r/β))."""
    reward_max: float | None = 1.0
    """Rejection: an upper bound on the reward (1 for the rule rewards); None = each prompt's best candidate (RSO's
    approximation)."""
    base_samples: int = 4
    """Independent base draws per prompt, for the win rate (never selected from)."""
    rewards: dict[str, float] | None = None
    """Rule rewards and weights (instructions, math, format, code), combined as a weighted mean; None = instructions."""
    reward_models: list[str] = field(default_factory=list)
    """Local sequence-classification reward-model directories (at most one without an ensemble)."""
    ensemble: Literal["mean", "min", "mean_minus_std", "uwo"] | None = None
    """Aggregate every named rule reward and reward model as an ensemble (weights ignored): mean, min (worst case),
    mean_minus_std, uwo (mean − λ·variance); population variance."""
    ensemble_lambda: float = 0.5
    """λ of mean_minus_std and uwo."""
    reward_transform: Literal["none", "calibrate", "ctrl_bon", "ctrl_won", "vbon"] = "none"
    """Score soft_best_of_n / tilted / rejection by a transform of the reward against the prompt's candidates:
    calibrate (quantile, ties ½), ctrl_bon exp(t·C), ctrl_won −exp(−t·C), vbon log F̂⁻ (tether.inference.transforms)."""
    ctrl_t: float = 1.0
    """t of the CTRL transforms."""
    qprobe: str | None = None
    """qprobe: a probe saved by an earlier run (qprobe.pt); None = train one on qprobe_train_file."""
    qprobe_train_file: str | None = None
    """qprobe: prompt rows to train the probe on (max(n) candidates each, scored by the reward)."""
    qprobe_objective: Literal["rewards", "preferences"] = "rewards"
    """Train the probe by ridge regression on the rewards, or Bradley–Terry on each prompt's best vs worst candidate."""
    qprobe_l2: float = 1e-2
    """L2 penalty of the probe (standardized features)."""
    max_new_tokens: int = 64
    """Length limit of every completion (a cut completion is an outcome of its own; counted)."""
    temperature: float = 1.0
    """Sampling temperature: π_ref is the model at this temperature."""
    exclude: list[str] = field(default_factory=list)
    """Strings the candidates must not contain as the tokenizer spells them (token exclusion, (G)I-DLE:
    ``tether.sampling.exclusion.Exclude.from_strings``, with and without a leading space). The candidates then come
    from the excluded sampler (the methods' KL figures are to it), and the report adds the exclusion's own exact KL
    cost to the model, ``intervention_kl`` (nats per draw, mean ± 95% CI over prompts)."""
    batch_size: int = 64
    """Completions generated together."""
    seed: int = 0
    """Seeds the candidates and every selection."""
    device: str = "cpu"
    """Where the model runs ('cpu' or 'cuda')."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        check_reward_names(self.rewards)
        if not self.methods or set(self.methods) - set(SAMPLE_METHODS):
            raise ValueError(f"methods: {self.methods!r}; give one or more of {list(SAMPLE_METHODS)}")
        if self.ensemble is None and len(self.reward_models) > 1:
            raise ValueError(f"reward_models: {len(self.reward_models)} given without an ensemble; set ensemble "
                             "(mean, min, mean_minus_std, uwo) or give one")
        if "qprobe" in self.methods and not (self.qprobe or self.qprobe_train_file):
            raise ValueError("methods: qprobe needs a trained probe (qprobe: path) or prompts to train one on "
                             "(qprobe_train_file)")
        if any(not s for s in self.exclude):
            raise ValueError(f"exclude: an empty string bans nothing; remove it from {self.exclude!r}")
        for name, ok in (("n", bool(self.n) and all(k >= 1 for k in self.n)),
                         ("tau", bool(self.tau) and all(t >= 0 for t in self.tau)),
                         ("beta", bool(self.beta) and all(b > 0 for b in self.beta)),
                         ("base_samples", self.base_samples >= 0), ("ctrl_t", self.ctrl_t > 0),
                         ("ensemble_lambda", self.ensemble_lambda >= 0), ("qprobe_l2", self.qprobe_l2 >= 0),
                         ("max_new_tokens", self.max_new_tokens >= 1), ("temperature", self.temperature > 0),
                         ("batch_size", self.batch_size >= 1)):
            check_range(name, getattr(self, name), ok, "tether sample")


@dataclass
class FrontierConfig:
    """The reward–KL frontier of several methods on the same held-out prompts: `tether frontier --config x.yaml`.

    Every point is measured by one evaluator (``tether.recipes.frontier``): held-out reward and KL(π ‖ π_ref) with
    π_ref = ``model`` at temperature 1. Empty lists switch a family off."""

    model: str = "smollm2-135m-instruct"
    """π_ref of every point and the starting policy of every training run: the embedded model or a local HF dir."""
    prompts_file: str = "data/ifeval_heldout_prompts.jsonl"
    """Held-out prompt rows (JSONL/Parquet/datasets) with 'prompt' plus what the rewards read ('constraints')."""
    max_prompts: int | None = None
    """Use the first this many rows of prompts_file (None = all)."""
    output_dir: str = "runs/frontier"
    """Where frontier.json, frontier.png, the point cache (frontier_cache.json) and the training runs go."""
    rewards: dict[str, float] | None = None
    """Rule rewards and weights (instructions, math, format, code), combined as a weighted mean; None = instructions."""
    max_new_tokens: int = 48
    """Length limit of every completion the evaluator samples (candidates and policy samples alike)."""
    samples_per_prompt: int = 4
    """Completions per prompt sampled from each model point (trained runs, saved models) for its reward and KL."""
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """N of the best-of-N points (all on the first N of one set of candidates per prompt)."""
    tilted_beta: list[float] = field(default_factory=list)
    """β of the tilted-resampling points (keep candidate i with probability ∝ exp(r_i/β) among tilted_n)."""
    tilted_n: int = 16
    """Candidates per prompt of tilted resampling."""
    base_samples: int = 8
    """Further reference draws per prompt, never selected: with the candidates they form the reward-level law the
    plug-in KL figures and the two analytic curves are computed on."""
    dpo_config: str | None = None
    """A `tether dpo` YAML whose run is repeated at every dpo_beta (model, output_dir, seed and the held-out KL are
    set by the frontier)."""
    dpo_beta: list[float] = field(default_factory=list)
    """β of the DPO-family points (the config's ``beta`` field)."""
    dpo_overrides: dict[str, float | int | str | bool] = field(default_factory=dict)
    """Fields set over dpo_config for every DPO run (e.g. {max_steps: 4})."""
    rl_config: str | None = None
    """A `tether rl` YAML whose run is repeated at every rl_beta × rl_steps (model, output_dir, seed set here; its
    own held-out evaluation is switched off — the frontier measures)."""
    rl_beta: list[float] = field(default_factory=list)
    """β (kl_coef) of the RL-family points."""
    rl_steps: list[int] = field(default_factory=list)
    """RL steps of the RL-family points (one run per value); empty = the config's own steps."""
    rl_overrides: dict[str, float | int | str | bool] = field(default_factory=dict)
    """Fields set over rl_config for every RL run (e.g. {prompts_per_step: 2})."""
    models: list[str] = field(default_factory=list)
    """Saved model directories (same tokenizer as model), each one point."""
    seed: int = 0
    """Seeds the candidates, every policy's evaluation samples (the same seed for each: common random numbers), the
    selections and the training runs."""
    batch_size: int = 32
    """Completions generated (and scored for KL) together."""
    chunk_size: int = 512
    """Response tokens per chunk of the LM head in the KL pass."""
    device: str = "cpu"
    """Where the models run ('cpu' or 'cuda')."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        check_reward_names(self.rewards)
        for beta_field, config_field in (("dpo_beta", "dpo_config"), ("rl_beta", "rl_config")):
            if getattr(self, beta_field) and not getattr(self, config_field):
                raise ValueError(f"{beta_field}: the runs need a recipe config; set {config_field} (a YAML file)")
        if self.rl_steps and not self.rl_beta:
            raise ValueError("rl_steps: set rl_beta too (the runs are rl_beta × rl_steps)")
        for name, ok in (("max_prompts", self.max_prompts is None or self.max_prompts >= 1),
                         ("max_new_tokens", self.max_new_tokens >= 1),
                         ("samples_per_prompt", self.samples_per_prompt >= 2),
                         ("best_of_n", all(n >= 1 for n in self.best_of_n)),
                         ("tilted_beta", all(b > 0 for b in self.tilted_beta)), ("tilted_n", self.tilted_n >= 1),
                         ("base_samples", self.base_samples >= 0),
                         ("dpo_beta", all(b > 0 for b in self.dpo_beta)),
                         ("rl_beta", all(b >= 0 for b in self.rl_beta)),
                         ("rl_steps", all(s >= 1 for s in self.rl_steps)),
                         ("batch_size", self.batch_size >= 1), ("chunk_size", self.chunk_size >= 1)):
            check_range(name, getattr(self, name), ok, "tether frontier")
        if not (self.best_of_n or self.tilted_beta or self.dpo_beta or self.rl_beta or self.models):
            raise ValueError("nothing to measure: set best_of_n, tilted_beta, dpo_beta, rl_beta or models")


@dataclass
class MergeConfig:
    """Merge model directories in weight space: `tether merge --config x.yaml` or `tether merge --models A B ...`
    (``tether.merge``)."""

    models: list[str] = field(default_factory=list)
    """The model directories merged (safetensors; the embedded model by name), all of one architecture."""
    method: Literal["soup", "slerp"] = "soup"
    """soup: Σ w_i θ_i (uniform unless weights); slerp: spherical interpolation of the two task vectors θ_i − base
    (WARP), tensor by tensor."""
    weights: list[float] | None = None
    """soup: one weight per model (None = uniform 1/n)."""
    base: str | None = None
    """The common initialization: slerp's task vectors are relative to it, LITI interpolates towards it; also
    measured against when prompts_file is set."""
    t: float = 0.5
    """slerp: λ in [0, 1] (0 = the first model, 1 = the second)."""
    eta: float = 1.0
    """LITI (WARP): θ = (1 − η)·base + η·merged, η in [0, 1]; 1 = no interpolation."""
    output_dir: str = "runs/merged"
    """The merged model directory (model.safetensors, config and tokenizer of the first model) and merge_report.json."""
    prompts_file: str | None = None
    """Held-out prompts: the exact token-level KL(merged ‖ each input and base) on completions sampled from the
    merged model. None = no measurement."""
    kl_samples_per_prompt: int = 4
    """Completions sampled per held-out prompt."""
    kl_max_new_tokens: int = 64
    """Length limit of those completions."""
    batch_size: int = 16
    """Completions generated (and scored) together."""
    seed: int = 0
    """Seeds the sampled completions."""
    device: str = "cpu"
    """Where the KL measurement runs ('cpu' or 'cuda'); the merge itself is on the CPU."""

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: give the model directories to merge (--models A B ...)")
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(f"weights: {len(self.weights)} weights for {len(self.models)} models; give one per model")
        if self.method == "slerp" and (len(self.models) != 2 or not self.base):
            raise ValueError("method slerp merges two task vectors relative to a base: set models to two directories "
                             "and base to their common initialization")
        if self.weights is not None and self.method != "soup":
            raise ValueError("weights: only method soup takes weights")
        if self.eta != 1.0 and not self.base:
            raise ValueError("eta: LITI interpolates towards the initialization; set base (or eta: 1)")
        for name, ok in (("t", 0.0 <= self.t <= 1.0), ("eta", 0.0 <= self.eta <= 1.0),
                         ("kl_samples_per_prompt", self.kl_samples_per_prompt >= 1),
                         ("kl_max_new_tokens", self.kl_max_new_tokens >= 1), ("batch_size", self.batch_size >= 1)):
            check_range(name, getattr(self, name), ok, "tether merge")


@dataclass
class DiagnoseConfig:
    """Where did training move the weights: `tether diagnose --base A --trained B` (``tether.diagnose``)."""

    base: str = "smollm2-135m-instruct"
    """The model before training (a directory, or the embedded model by name)."""
    trained: str = ""
    """The trained model directory (same architecture)."""
    output_dir: str = "runs/diagnose"
    """Where diagnose.json and diagnose.png go."""
    subspace_rank: int = 16
    """k: the base's top-k singular subspaces (principal angles, the update's share outside them)."""
    tolerance: float = 2.0 ** -9
    """Relative tolerance of the 'below tolerance' sparsity: |ΔW_ij| ≤ tolerance·|W_ij| (default: half of bf16's
    relative spacing)."""
    singular_values: int = 8
    """How many top singular values of each matrix the report lists (base and trained)."""

    def __post_init__(self) -> None:
        if not self.trained:
            raise ValueError("trained: give the trained model directory (--trained DIR)")
        for name, ok in (("subspace_rank", self.subspace_rank >= 1), ("tolerance", 0.0 <= self.tolerance < 1.0),
                         ("singular_values", self.singular_values >= 1)):
            check_range(name, getattr(self, name), ok, "tether diagnose")
