"""One typed config per training recipe (``tether quickstart``, ``dpo``, ``rl``, ``distill``), each a flat dataclass
over the shared parts of ``tether.config``; the commands that train no model of their own (``kl``, ``sample``,
``frontier``, ``merge``, ``diagnose``) have theirs in ``tether.recipes.analysis_configs``.

A YAML file sets fields, command-line flags override them (``tether.cli``), and ``__post_init__`` validates the
result, so a bad value fails before any work with a message that names the field. The recipes import their config
from here; ``tether <command> --help`` lists every field with the documentation written beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tether.config import LoRAConfig, ModelConfig, OptimConfig, RunConfig, check_range
from tether.losses.policy import ONLINE_OBJECTIVES, check_loss_args

__all__ = ["DistillConfig", "PreferenceConfig", "QuickstartConfig", "RLConfig", "ReferenceConfig",
           "check_reward_names"]


def check_reward_names(rewards: dict[str, float] | None, alternative: str = "") -> None:
    """Every key of a config's ``rewards`` must name a rule reward of ``tether.rewards``."""
    from tether.rewards import REWARD_NAMES

    for name in rewards or {}:
        if name not in REWARD_NAMES:
            raise ValueError(f"rewards: unknown reward {name!r}; choose from {sorted(REWARD_NAMES)}{alternative}")


@dataclass
class ReferenceConfig:
    """Which reference the KL terms are to, and how it moves (``tether.reference.ReferenceSync``): a field group of
    the training recipes' configs."""

    ref_strategy: Literal["fixed", "ema", "reset", "soup", "trdpo_soft", "trdpo_hard"] = "fixed"
    """fixed: the start (or ref_model); ema: WARP's EMA anchor θ_ref ← (1−r)θ_ref + rθ every ref_every steps; reset:
    ProRL, every ref_every steps the reference becomes the policy and the optimizer state is cleared; soup: SALSA,
    the uniform average of the ref_soup models; trdpo_soft / trdpo_hard: TR-DPO's soft (α = ref_rate) / hard
    update every τ = ref_every steps. Steps are optimizer steps."""
    ref_rate: float | None = None
    """r of the moving update: WARP's μ (ema, default 0.01, as recalled — unverified), TR-DPO's α (trdpo_soft,
    default 0.6, TRL's); 0 = fixed, 1 = copy the policy (reset and trdpo_hard always copy)."""
    ref_every: int | None = None
    """K, optimizer steps between reference updates; default 1 for ema, 512 (TR-DPO's τ in TRL) for trdpo_*; reset
    needs it set."""
    ref_soup: list[str] = field(default_factory=list)
    """ref_strategy soup: the model directories averaged (uniformly) into the reference."""

    def __post_init__(self) -> None:
        moving = self.ref_strategy in ("ema", "reset", "trdpo_soft", "trdpo_hard")
        if self.ref_strategy == "reset" and self.ref_every is None:
            raise ValueError("ref_every: ref_strategy reset needs the number of optimizer steps between resets")
        if (self.ref_strategy == "soup") != (len(self.ref_soup) >= 2):
            raise ValueError("ref_soup: set it (two or more model directories) exactly when ref_strategy is soup")
        if self.ref_rate is not None and self.ref_strategy not in ("ema", "trdpo_soft"):
            raise ValueError(f"ref_rate: only ema and trdpo_soft take a rate; ref_strategy is {self.ref_strategy}")
        if self.ref_every is not None and not moving:
            raise ValueError(f"ref_every: ref_strategy {self.ref_strategy} does not move; unset ref_every")
        for name, clash in (("lora", getattr(self, "lora", False)), ("ref_model", getattr(self, "ref_model", None))):
            if clash and (moving or self.ref_strategy == "soup"):
                raise ValueError(f"ref_strategy {self.ref_strategy}: the reference is built from the policy (or the "
                                 f"soup) and does not combine with {name} — unset one of them")
        self.reference_sync()  # checks rate and period
        super().__post_init__()

    def reference_sync(self):
        """A fresh ``tether.reference.ReferenceSync`` of these fields (defaults filled in)."""
        from tether.reference import ReferenceSync

        rate = self.ref_rate if self.ref_rate is not None else {"ema": 0.01, "trdpo_soft": 0.6}.get(
            self.ref_strategy, 1.0)
        every = self.ref_every if self.ref_every is not None else (
            512 if self.ref_strategy.startswith("trdpo") else 1)
        return ReferenceSync(self.ref_strategy, rate=rate, every=every)


@dataclass
class RLConfig(ReferenceConfig, LoRAConfig, OptimConfig, ModelConfig, RunConfig):
    """Online RL with group sampling: `tether rl --config x.yaml [--field value ...]`."""

    output_dir: str = "runs/rl"
    lr: float = 1e-6
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    teacher_model: str | None = None
    """KDRL's teacher (a local directory); None = the reference."""
    task: Literal["instructions", "arithmetic"] = "instructions"
    """Generated task when prompts_file is not set: IFEval-style instructions, or small arithmetic word problems."""
    prompts_file: str | None = None
    """Training prompts: JSONL/Parquet/datasets rows with 'prompt' (string or chat messages) plus whatever the
    rewards read (e.g. 'answer', 'constraints', 'tests')."""
    eval_prompts_file: str | None = None
    """Held-out prompts (same format); None with a generated task = its held-out split."""
    train_prompts: int = 256
    """Size of the generated training pool."""
    eval_prompts: int = 32
    """Size of the generated held-out set (0 disables held-out evaluation)."""
    rewards: dict[str, float] | None = None
    """Reward components and weights, combined as a weighted mean: instructions, math, format, code. None = the
    task's rule reward."""
    reward_model: str | None = None
    """A local sequence-classification model directory added as a reward component 'reward_model'."""
    reward_model_weight: float = 1.0
    """Weight of the reward model in the combination."""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty over the last N tokens before max_new_tokens (added to the reward; 0 = off)."""
    reward_transform: Literal["calibrate", "ctrl_bon", "ctrl_won", "vbon"] | None = None
    """Replace each reward, right after it is computed, by its transform against reference samples of the same prompt
    (drawn once per prompt, cached; tether.inference.transforms): calibrate (quantile, ties ½), ctrl_bon exp(t·C) /
    ctrl_won −exp(−t·C) (InfAlign's CTRL), vbon log F̂⁻ (vBoN's bound; set kl_coef = 1/(N−1)). The logged step
    reward is the transformed one; the held-out reward stays raw. None = off."""
    reward_transform_args: dict[str, float | int] = field(default_factory=dict)
    """Arguments of the transform: {t: …} for ctrl_bon / ctrl_won, {samples: K} reference samples per prompt
    (default 16)."""
    loss: str = "grpo"
    """Objective by name: ppo_clip, grpo, dapo, gpg, cpgd, rpg, archer, gvpo, disco, apo, kdrl, troll,
    critical_token_kl, astar_po."""
    loss_args: dict[str, float | int | str | bool] = field(default_factory=dict)
    """Hyperparameters of the objective, by keyword (e.g. {clip_eps_high: 0.28}, {beta: 0.1}); checked against its
    signature."""
    advantage: Literal["grpo", "drgrpo", "rloo", "reinforce_pp", "gpg"] | None = None
    """Advantage estimator; None = the objective's default (GPG: gpg, others: grpo)."""
    kl_coef: float | None = None
    """β of the KL to the reference; None = the objective's default (GRPO 0.04, others 0)."""
    kl_estimator: Literal["k1", "k2", "k3", "k3_is", "exact"] = "k3"
    """Which KL estimate carries the gradient (value and gradient of each: tether.kl, tether.losses.kl_penalty)."""
    kl_placement: Literal["loss", "reward"] = "loss"
    """Put β·k in the loss, or subtract it from the reward (k1/k2/k3 only)."""
    kl_importance_weight: bool = True
    """In the loss, weight k1/k2/k3 by sg(π/π_old) so off-policy mini-batches keep the on-policy gradient."""
    target_kl: float | None = None
    """Adapt β towards this sequence-level KL (nats per completion); None = fixed β."""
    kl_horizon: float = 10000.0
    """Adaptive controller horizon (in sequences)."""
    steps: int = 20
    """RL steps (rollout + updates)."""
    prompts_per_step: int = 4
    """Prompts per rollout."""
    group_size: int = 8
    """Completions per prompt (G)."""
    max_new_tokens: int = 48
    """Length limit of each completion (and Dr. GRPO's constant normaliser)."""
    temperature: float = 1.0
    """Sampling temperature (also used to compute the policy's log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    stop_strings: list[str] = field(default_factory=list)
    """Completions end at the first of these (kept in the completion)."""
    engine: Literal["tether", "hf", "vllm"] = "tether"
    """Rollout engine: tether's KV-cache loop, transformers' generate, or vLLM (GPU machines, optional extra)."""
    constraint: str = ""
    """Rollouts sampled under a grammar (tether.sampling.constraints), as 'kind:spec', kind json_schema, regex,
    choice or lark: 'regex:[0-9]+', 'choice:["yes", "no"]', 'json_schema:@schema.json' (from a file); '' = free.
    The update uses the policy's own log-probs of the sampled tokens; held-out reward and KL are measured without
    the constraint. Needs engine tether."""
    constraint_delimiters: list[str] = field(default_factory=list)
    """CRANE-style switching: [open, close] — free text, the constraint only between the two delimiters;
    [] = the whole completion is constrained."""
    sample_batch_size: int = 64
    """Completions generated together."""
    drop_uniform_groups: bool = False
    """DAPO dynamic sampling: groups whose rewards are all equal leave the loss (counted); with max_refill_rounds
    new groups take their place."""
    difficulty_low: float = 0.0
    """Online difficulty filtering: groups whose pass rate (share of completions with reward ≥ pass_threshold) is
    below this leave the loss (counted); with max_refill_rounds new groups take their place. 0 = no lower bound."""
    difficulty_high: float = 1.0
    """Online difficulty filtering: groups whose pass rate is above this leave the loss, as difficulty_low. 1 = no
    upper bound."""
    pass_threshold: float = 1.0
    """A completion passes (is correct) when its reward is ≥ this: the pass rate of the difficulty band and the
    accuracy of care_bonus. 1.0 = full marks (math: the verified answer; instructions: every constraint met)."""
    max_refill_rounds: int = 0
    """Sampling rounds per step, after the first, that replace dropped groups (drop_uniform_groups, the difficulty
    band) by groups of new prompts (tether.group_filter); groups still dropped after them stay out of the loss."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batches: int = 1
    """Optimizer steps per pass (the batch is split into this many mini-batches of whole groups)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward (memory knob; does not change the gradient)."""
    care_bonus: float = 0.0
    """GRPO-CARE's consistency bonus λ (0.5 in the paper's scripts; 0 = off): a passing completion whose answer the
    EMA reference finds at least as likely as its group's passing ones do gets +λ (grpo_care_bonus; answer span:
    tether.rollout.answer_mask). Needs ref_strategy ema (GRPO-CARE's scripts: ref_rate 0.005, ref_every 10, i.e.
    decay 0.995 every 10 optimizer steps)."""
    care_args: dict[str, float] = field(default_factory=dict)
    """Other arguments of the bonus: {confidence_cap: 0.95, margin: 0.01} (the paper's scripts)."""
    astar_value_samples: int = 8
    """A*-PO (loss astar_po) stage 1: reference completions per training prompt for V* (8 in the official script)."""
    astar_value_beta: float = 0.5
    """A*-PO stage 1: β₁ of V*(x) = β₁·log mean_j exp(r_j/β₁) (0.5 official); the regression's β₂ is loss_args.beta."""
    share_prompts: bool = True
    """Run each group's prompt through the backbone once in the scoring and update passes (same values and gradients
    as running it for every completion; ``tether.prefix``). Ignored under gradient checkpointing."""
    eval_samples_per_prompt: int = 4
    """Completions per held-out prompt for the reward before/after."""
    eval_every: int = 0
    """Also measure the held-out reward every N steps (0 = only before and after)."""
    kl_samples_per_prompt: int = 4
    """Completions per held-out prompt for the final KL measurement (temperature 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_loss_args(self.loss, self.loss_args)
        if ONLINE_OBJECTIVES[self.loss].own_kl and self.kl_coef:
            raise ValueError(f"kl_coef: {self.loss!r} carries its own KL term (set its β in loss_args); "
                             "leave kl_coef unset or 0")
        if self.kl_placement == "reward" and self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator: {self.kl_estimator!r} cannot be placed in the reward; use k1, k2 or "
                             "k3 there (k1 gives the exact sequence-level reverse-KL gradient)")
        check_reward_names(self.rewards, " (or reward_model)")
        from tether.inference.transforms import check_reward_transform

        check_reward_transform(self.reward_transform, self.reward_transform_args)
        if self.constraint or self.constraint_delimiters:
            from tether.sampling.constraints import check_constraint_fields

            check_constraint_fields(self.constraint, self.constraint_delimiters, engine=self.engine)
        if self.reward_transform and self.ref_strategy != "fixed":
            raise ValueError("reward_transform: its calibration tables come from the starting reference; with "
                             f"ref_strategy {self.ref_strategy} the reference is another model — use one or the other")
        for name, ok in (("steps", self.steps >= 1), ("prompts_per_step", self.prompts_per_step >= 1),
                         ("group_size", self.group_size >= (2 if ONLINE_OBJECTIVES[self.loss].grouped else 1)),
                         ("max_new_tokens", self.max_new_tokens >= 1),
                         ("ppo_epochs", self.ppo_epochs >= 1),
                         ("mini_batches", 1 <= self.mini_batches <= self.prompts_per_step),
                         ("micro_batch_size", self.micro_batch_size >= 1),
                         ("kl_coef", self.kl_coef is None or self.kl_coef >= 0),
                         ("target_kl", self.target_kl is None or self.target_kl > 0),
                         ("temperature", self.temperature > 0),
                         ("overlong_buffer", 0 <= self.overlong_buffer < self.max_new_tokens)):
            check_range(name, getattr(self, name), ok, "tether rl")
        if self.prompts_per_step % self.mini_batches:
            raise ValueError(f"mini_batches={self.mini_batches} must divide prompts_per_step="
                             f"{self.prompts_per_step} (mini-batches hold whole groups)")
        self._check_filters_and_moving_reference()

    def _check_filters_and_moving_reference(self) -> None:
        for key in ONLINE_OBJECTIVES[self.loss].stat_args:  # TROLL's max_support, the critical-token KL's T'
            value = self.loss_args.get(key)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"loss_args.{key}={value!r} must be a positive number")
        if self.loss_args.get("max_support") is not None and self.loss_args["max_support"] != int(
                self.loss_args["max_support"]):
            raise ValueError(f"loss_args.max_support={self.loss_args['max_support']!r} must be a whole number")
        for name, ok in (("difficulty_low", 0.0 <= self.difficulty_low <= self.difficulty_high),
                         ("difficulty_high", self.difficulty_high <= 1.0),
                         ("max_refill_rounds", self.max_refill_rounds >= 0),
                         ("care_bonus", self.care_bonus >= 0),
                         ("astar_value_samples", self.astar_value_samples >= 1),
                         ("astar_value_beta", 0.0 < self.astar_value_beta < float("inf"))):
            check_range(name, getattr(self, name), ok, "tether rl")
        filtered = self.drop_uniform_groups or self.difficulty_low > 0.0 or self.difficulty_high < 1.0
        if self.max_refill_rounds and not filtered:
            raise ValueError("max_refill_rounds: nothing is dropped to refill; set drop_uniform_groups or "
                             "difficulty_low / difficulty_high")
        if filtered and self.group_size == 1:
            raise ValueError("drop_uniform_groups / difficulty_low / difficulty_high filter groups of completions; "
                             "with group_size 1 there are none — unset them")
        if self.reward_transform and (self.max_refill_rounds or self.difficulty_low > 0 or self.difficulty_high < 1):
            raise ValueError("reward_transform recomputes which groups enter the loss; it does not combine with "
                             "max_refill_rounds or the difficulty band — use one or the other")
        if self.care_bonus and self.ref_strategy != "ema":
            raise ValueError("care_bonus: GRPO-CARE measures consistency with an EMA reference; set ref_strategy: "
                             "ema (the paper's scripts: ref_rate 0.005, ref_every 10)")
        unknown = set(self.care_args) - {"confidence_cap", "margin"}
        if unknown:
            raise ValueError(f"care_args: {sorted(unknown)} are not arguments of the bonus; it accepts "
                             "confidence_cap and margin")

    @property
    def beta(self) -> float:
        """The initial KL coefficient: kl_coef, or the objective's default."""
        return ONLINE_OBJECTIVES[self.loss].default_kl_coef if self.kl_coef is None else self.kl_coef

    @property
    def advantage_name(self) -> str:
        return self.advantage or ONLINE_OBJECTIVES[self.loss].default_advantage


_PREFERENCE_INPUT_KWARGS = {"chosen_lengths", "rejected_lengths", "chosen_seq_kl", "rejected_seq_kl",
                            "chosen_seq_risk", "rejected_seq_risk", "chosen_seq_risk_split", "rejected_seq_risk_split",
                            "kl_reference", "chosen_nll"}


@dataclass
class PreferenceConfig(ReferenceConfig, LoRAConfig, OptimConfig, ModelConfig, RunConfig):
    """Offline preference optimization: `tether dpo --config x.yaml [--field value ...]`."""

    output_dir: str = "runs/dpo"
    train_file: str = ""
    """Preference data with prompt/chosen/rejected (strings or chat messages): JSONL, Parquet, or a directory
    written by `datasets.Dataset.save_to_disk`."""
    loss: str = "dpo"
    """Objective, by name: one of tether.losses.PREFERENCE_LOSSES (dpo, ipo, hinge_dpo, robust_dpo, f_dpo, tdpo,
    tdpo1, tdpo2, hdpo, ra_dpo, longpo, simpo, orpo, kto)."""
    beta: float | None = None
    """β, the KL coefficient (for SimPO its reward scale, for ORPO its λ); None = the objective's own default
    (0.1 for DPO, 2.0 for SimPO, 0.01 for LongPO — see each function's docstring)."""
    loss_args: dict[str, float | int | str | bool] = field(default_factory=dict)
    """Other hyperparameters of the objective, by keyword (e.g. {label_smoothing: 0.1}, {divergence: js},
    {alpha: 0.5}); checked against the objective's signature."""
    ref_prompt_field: str = "ref_prompt"
    """LongPO: the row field holding the short context the reference is scored on."""
    max_length: int = 512
    """Most tokens of prompt + one completion; longer completions are truncated (and counted)."""
    max_prompt_length: int = 256
    """Most prompt tokens after the chat template; a longer prompt is a bad row."""
    use_chat_template: bool = True
    """Wrap string rows in the tokenizer's chat template as one user and one assistant turn."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad rows: stop with the list of problems ('raise'), or drop them, counted and reported ('skip')."""
    truncation: Literal["truncate", "drop", "error"] = "truncate"
    """Completions longer than max_length: truncate (counted), drop the row (counted), or stop."""
    curriculum_key: str | None = None
    """Order training pairs by this numeric row field, ascending (e.g. n_constraints), instead of shuffling."""
    epochs: int = 1
    """Passes over the data."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule is planned for it); None = epochs × steps/epoch."""
    batch_size: int = 4
    """Pairs per micro-batch (each pair = chosen + rejected in one forward pass)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    risk_confidence: float = 0.95
    """Ra-DPO's confidence level c: the per-token risk keeps log-ratios above the (1−c) vocabulary quantile."""
    eval_prompts_file: str | None = None
    """Held-out prompts (JSONL/Parquet with a 'prompt' field) for the KL measurement after training."""
    kl_samples_per_prompt: int = 4
    """Completions sampled per held-out prompt for the KL measurement."""
    kl_max_new_tokens: int = 64
    """Length limit of those completions."""

    def __post_init__(self) -> None:
        super().__post_init__()
        import inspect

        from tether.losses.preference import PREFERENCE_LOSSES

        if self.loss not in PREFERENCE_LOSSES:
            raise ValueError(f"loss: unknown objective {self.loss!r}; choose one of {sorted(PREFERENCE_LOSSES)}")
        params = inspect.signature(PREFERENCE_LOSSES[self.loss].fn).parameters
        allowed = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - _PREFERENCE_INPUT_KWARGS - {"beta"}
        unknown = set(self.loss_args) - allowed
        if unknown:
            raise ValueError(f"loss_args: {sorted(unknown)} are not hyperparameters of {self.loss!r}; "
                             f"it accepts {sorted(allowed)} (and beta as its own field)")
        if self.loss_args.get("split_risk_ratio"):
            raise ValueError("loss_args.split_risk_ratio: the recipe computes Ra-DPO's risk chunk by chunk over the "
                             "whole vocabulary; the official code's split-vocabulary risk is available from full "
                             "logits (tether.losses.sequential_risk(split_vocab=True) with ra_dpo(split_risk_ratio="
                             "True)), not in this recipe")
        for name, ok in (("batch_size", self.batch_size >= 1), ("grad_accum", self.grad_accum >= 1),
                         ("epochs", self.epochs >= 1), ("max_steps", self.max_steps is None or self.max_steps >= 1),
                         ("beta", self.beta is None or self.beta > 0),
                         ("max_prompt_length", 0 < self.max_prompt_length < self.max_length),
                         ("kl_samples_per_prompt", self.kl_samples_per_prompt >= 1),
                         ("kl_max_new_tokens", self.kl_max_new_tokens >= 1)):
            check_range(name, getattr(self, name), ok, "tether dpo")
        spec = PREFERENCE_LOSSES[self.loss]
        if self.ref_strategy != "fixed" and not spec.uses_reference:
            raise ValueError(f"ref_strategy: {self.loss!r} is reference-free; leave ref_strategy fixed")
        moving = self.reference_sync().moving
        if moving and self.loss == "longpo":
            raise ValueError("ref_strategy: LongPO scores its reference on a short context; a moving reference is "
                             "not supported there — use fixed or soup")
        if moving and self.distributed == "fsdp2":
            raise ValueError(f"ref_strategy {self.ref_strategy} reads the policy's full weights after every step; "
                             "with distributed: fsdp2 it is not supported — use distributed: ddp")
        if "kl_reference" in spec.needs and self.distributed != "none":
            # KTO's reference point z₀ is a mean over the whole micro-batch: each rank would average its own rows
            # only and train on a different loss than one process.
            raise ValueError(f"loss: {self.loss!r} with distributed: {self.distributed} is not supported (its "
                             "reference point is a batch mean not synchronized across ranks); use distributed: none")


@dataclass
class QuickstartConfig:
    """Self-generated DPO on a verifiable instruction-following task: `tether quickstart [--field value ...]`."""

    output_dir: str = "runs/quickstart"
    """Where pairs, the trained model, metrics, the report and the plot go."""
    model: str = "smollm2-135m-instruct"
    """Starting policy (and reference): the embedded model or a local HF directory."""
    train_prompts: int = 64
    """Training prompts (each gets samples_per_prompt completions)."""
    heldout_prompts: int = 32
    """Held-out prompts (unseen requests) for reward and KL."""
    samples_per_prompt: int = 4
    """Completions sampled per prompt, for pairs and for evaluation."""
    max_new_tokens: int = 48
    """Length limit of every sampled completion."""
    temperature: float = 0.8
    """Sampling temperature for pair construction and reward evaluation."""
    sample_batch_size: int = 64
    """Completions generated together."""
    seed: int = 0
    """Seeds prompts, sampling and training."""
    beta: float = 0.1
    """DPO β."""
    lr: float = 5e-5
    """DPO learning rate."""
    epochs: int = 3
    """DPO passes over the pairs."""
    batch_size: int = 8
    """Pairs per optimizer step."""
    kl_samples_per_prompt: int = 4
    """Samples per held-out prompt for the KL measurement (at temperature 1)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        for name, ok in (("train_prompts", self.train_prompts >= 1), ("heldout_prompts", self.heldout_prompts >= 1),
                         ("samples_per_prompt", self.samples_per_prompt >= 2),
                         ("max_new_tokens", self.max_new_tokens >= 1), ("temperature", self.temperature > 0),
                         ("beta", self.beta > 0), ("lr", self.lr > 0), ("epochs", self.epochs >= 1),
                         ("batch_size", self.batch_size >= 1),
                         ("kl_samples_per_prompt", self.kl_samples_per_prompt >= 1)):
            check_range(name, getattr(self, name), ok, "tether quickstart")


@dataclass
class DistillConfig(LoRAConfig, OptimConfig, ModelConfig, RunConfig):
    """Distill a teacher into a student by matching next-token distributions: `tether distill --config x.yaml`."""

    output_dir: str = "runs/distill"
    model: str = "derived"
    """Student: 'derived' (the teacher with every student_stride-th layer, built and cached on first use) or a local
    Hugging Face model directory sharing the teacher's tokenizer."""
    teacher_model: str = "smollm2-135m-instruct"
    """Teacher: the embedded model or a local Hugging Face model directory."""
    student_stride: int = 2
    """With model 'derived': keep the teacher's decoder layers 0, stride, 2·stride, …"""
    lr: float = 5e-5
    mode: Literal["off_policy", "seqkd", "on_policy", "dckd", "dpkd", "minillm", "adpa"] = "off_policy"
    """What is scored and by which objective. With the configured divergence: off_policy — the dataset's responses;
    seqkd — the teacher's samples (sequence-level KD); on_policy — the student's own samples with probability lmbda
    per step, else the dataset's (GKD). With an objective of their own (divergence left at forward_kl): dckd —
    forward KL on the dataset's chosen AND rejected responses plus nll_weight × NLL on chosen (DCKD, Gao et al. 2025;
    dckd_*_weight); dpkd — token-level DPKD (Li et al. 2024) under teacher forcing on the dataset response
    (dpkd_beta); minillm — MiniLLM (Gu et al. 2024) on teacher-mixed samples: PPO-clip long-term term + the exact
    single-step reverse KL (teacher_mixed_alpha, ppo_epochs); adpa — ADPA (Gao et al. 2025) on the student's own
    samples: the DPO teacher's (teacher_model) advantage over its reference (ref_model) on its top adpa_top_k tokens,
    plus nll_weight × NLL on the dataset's chosen responses."""
    divergence: str = "forward_kl"
    """Per-token divergence between teacher and student (tether.losses.distill.DIVERGENCES): forward_kl,
    reverse_kl, generalized_jsd, skew_kl, skew_reverse_kl, total_variation, akl, …"""
    divergence_args: dict[str, float | int | str | bool] = field(default_factory=dict)
    """Hyperparameters of the divergence, by keyword (e.g. {beta: 0.5} for generalized_jsd, {alpha: 0.1})."""
    divergence_temperature: float = 1.0
    """Temperature applied to both teacher and student logits inside the divergence."""
    lmbda: float = 0.5
    """on_policy: probability that a step trains on fresh student samples (GKD's λ; 1 = only student samples,
    0 = only dataset responses)."""
    nll_weight: float = 0.0
    """Weight of the student's negative log-likelihood of the dataset response, added to the divergence (only on
    steps that score dataset responses); dckd's w_sft and DPKD's (1 − kd_ratio) NLL term."""
    dckd_chosen_weight: float = 1.0
    """dckd: weight w_c of the token-mean forward KL on the chosen responses. The authors' DCKD recipe
    (gaoshiping/ADPA@a95c32f, recipes/llama3.2-1b-deita-dpomix/student_dckd.yaml) uses w_c = w_r = 0.1 with
    NLL weight 1 (nll_weight); tether's 1.0 keeps their w_c = w_r ratio and, at nll_weight 0, only rescales the
    step (tether.losses.distill.dckd)."""
    dckd_rejected_weight: float = 1.0
    """dckd: weight w_r of the token-mean forward KL on the rejected responses (0 skips them); the authors' recipe:
    0.1, equal to w_c (see dckd_chosen_weight)."""
    dckd_teacher_top_k: int = 0
    """dckd: 0 — the exact forward KL over the full vocabulary; k (official 50) — the teacher stored once per
    position of the chosen and rejected responses as its top-k probabilities + the remaining mass (fingerprinted file
    in output_dir), the KL taken over those k + 1 bins. It drops rest_p × KL of the two renormalized tails
    (tether.losses.distill.topk_forward_kl)."""
    dpkd_beta: float = 0.1
    """dpkd: β of the per-position Bradley–Terry loss (official --dpo-beta 0.1)."""
    teacher_mixed_alpha: float = 0.0
    """minillm: the teacher's share α ∈ [0, 1) of the sampling mixture p̃ = α·p + (1 − α)·q (tether.sampling.mixing);
    each token's long-term term is weighted by w_t = q_old/p̃ (official --teacher-mixed-alpha 0.2; 0 = the student's
    own samples, every weight 1)."""
    ppo_epochs: int = 1
    """minillm: optimizer updates per rollout — each step samples once, then takes ppo_epochs updates over the same
    responses (PPO-clip ε 0.2 on the ratio to the rollout student; official --ppo-epochs 4). The learning-rate
    schedule counts updates (steps × ppo_epochs)."""
    adpa_top_k: int = 50
    """adpa: K, the DPO teacher's top-k tokens that carry an advantage (50 in the ADPA code)."""
    train_file: str | None = "data/ifeval_pairs_smollm2.jsonl"
    """Prompts and responses: preference-format rows (prompt / chosen / rejected); 'chosen' is the dataset
    response (dckd also reads 'rejected'). Required by off_policy, on_policy, dckd, dpkd and adpa (its NLL); seqkd
    and minillm only read its prompts."""
    max_length: int = 512
    """Most tokens of prompt + dataset response (longer responses are truncated, counted)."""
    max_prompt_length: int = 256
    """Most prompt tokens after the chat template."""
    steps: int = 40
    """Optimizer steps."""
    batch_size: int = 8
    """Prompts (responses) per optimizer step."""
    micro_batch_size: int = 8
    """Sequences per forward/backward (memory knob; does not change the gradient)."""
    max_new_tokens: int = 48
    """Length limit of sampled responses (teacher or student)."""
    temperature: float = 1.0
    """Sampling temperature of teacher and student responses."""
    cache_teacher: bool = True
    """Modes that score dataset responses (off_policy, on_policy, dckd's chosen side, dpkd): compute the teacher's final
    hidden states on the dataset responses once and cache them on disk (fingerprinted), instead of a teacher forward
    pass every step."""
    eval_prompts_file: str | None = "data/ifeval_heldout_prompts.jsonl"
    """Held-out prompts (with IFEval-style 'constraints' for the rule reward); None = the generated held-out split."""
    eval_prompts: int = 32
    """Size of the generated held-out set when eval_prompts_file is None (0 disables the report)."""
    eval_samples_per_prompt: int = 2
    """Completions per held-out prompt for the student's rule reward before and after."""
    kl_samples_per_prompt: int = 2
    """Completions per held-out prompt for each direction of the teacher–student KL."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from tether.losses.distill import DIVERGENCES

        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence: unknown {self.divergence!r}; choose one of {sorted(DIVERGENCES)}")
        if self.mode != "dckd" and self.dckd_teacher_top_k:
            raise ValueError(f"dckd_teacher_top_k: only mode 'dckd' reads it (mode {self.mode!r}); leave it at 0")
        if self.mode != "minillm" and (self.teacher_mixed_alpha != 0.0 or self.ppo_epochs != 1):
            raise ValueError(f"teacher_mixed_alpha / ppo_epochs: only mode 'minillm' reads them (mode {self.mode!r}); "
                             "leave them at 0 / 1")
        if self.mode == "adpa" and not self.ref_model:
            raise ValueError("ref_model: mode 'adpa' needs the reference teacher (the model the DPO teacher "
                             "teacher_model was trained from), a local model directory")
        if self.mode in ("dckd", "dpkd", "minillm", "adpa") and (
                self.divergence != "forward_kl" or self.divergence_args or self.divergence_temperature != 1.0):
            raise ValueError(f"divergence: mode {self.mode!r} has its own objective and does not read divergence, "
                             "divergence_args or divergence_temperature; leave them at forward_kl, {}, 1")
        if self.mode in ("off_policy", "on_policy", "dckd", "dpkd", "adpa") and not self.train_file:
            raise ValueError(f"train_file: mode {self.mode!r} trains on dataset responses; give a preference-format "
                             "file (prompt / chosen / rejected)")
        for name, ok in (("student_stride", self.student_stride >= 1), ("steps", self.steps >= 1),
                         ("batch_size", self.batch_size >= 1), ("micro_batch_size", self.micro_batch_size >= 1),
                         ("max_new_tokens", self.max_new_tokens >= 1), ("temperature", self.temperature > 0),
                         ("divergence_temperature", self.divergence_temperature > 0),
                         ("lmbda", 0 <= self.lmbda <= 1), ("nll_weight", self.nll_weight >= 0),
                         ("dckd_chosen_weight", self.dckd_chosen_weight >= 0),
                         ("dckd_rejected_weight", self.dckd_rejected_weight >= 0), ("dpkd_beta", self.dpkd_beta > 0),
                         ("adpa_top_k", self.adpa_top_k >= 1), ("dckd_teacher_top_k", self.dckd_teacher_top_k >= 0),
                         ("teacher_mixed_alpha", 0 <= self.teacher_mixed_alpha < 1),
                         ("ppo_epochs", self.ppo_epochs >= 1),
                         ("max_prompt_length", 0 < self.max_prompt_length < self.max_length),
                         ("eval_prompts", self.eval_prompts >= 0),
                         ("eval_samples_per_prompt", self.eval_samples_per_prompt >= 1),
                         ("kl_samples_per_prompt", self.kl_samples_per_prompt >= 1)):
            check_range(name, getattr(self, name), ok, "tether distill")
