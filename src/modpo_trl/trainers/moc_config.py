from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import DPOConfig

from ..conditioning.preference import check_preference
from .margins import check_margin_fields

PREFERENCE_SAMPLINGS = ("dirichlet", "grid")
# TRL's loss types that are a function of one pair's implicit rewards: MOC weights each pair by its own preference.
PAIR_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
MOO_SOLVERS = ("weighted_mgda", "mgda", "linear")
MGDA_NORMALIZATIONS = ("l2", "none")
CONDITIONINGS = ("auto", "adapter", "prompt", "both")
CONTROL_LOSSES = ("zscore", "paired")


@dataclass
class MOCConfig(DPOConfig):
    r"""
    Configuration class for the [`MOCTrainer`]: every [`~trl.DPOConfig`] field plus the ones below.

    MOC (after "One Model for All: Multi-Objective Controllable Language Models") trains ONE policy conditioned on
    a preference `w` over the objectives, so that a single adapter covers the whole front. `w` enters the model
    inside the LoRA adapter (`modpo_trl.conditioning.svd_lora`, Panacea's way), as prompt text
    (`modpo_trl.conditioning.preference.condition_prompt`, the paper's way), or both. The defaults are the settings
    measured best on the offline quickstart (docs/moc.md): the adapter split into one gated block per objective,
    every pair under 2 grid preferences, the paired control loss and the linear combination; the paper's are
    `conditioning="prompt"`, `preference_sampling="dirichlet"`, `preference_augmentation=1`, `control_loss="zscore"`,
    `moo_solver="mgda"`. Here it is RL-free: every pair carries one
    objective's label and is trained with a DPO loss under its example's `w`; objectives without pairs enter
    through their frozen reward as MODPO's margin.

    Per pair b, labelled by objective i, with preference w, D the objectives with pairs, dr_j the chosen-minus-rejected
    margin reward of an objective j without pairs, m_b = beta * (log-ratio of chosen - log-ratio of rejected) the
    implicit reward margin, and t = max(sum_{m in D} w_m, 0.01) (see `MOCTrainer`):

        z_b = (m_b - sum_j w_j dr_j) / t                                        # MODPO's logit
        L_i = weighted mean over objective i's pairs of -log sigmoid(z_b), pair weight t * w_i / sum_{m in D} w_m
        C   = the controllability loss (`control_loss`)

    With `w = e_k` this is exactly DPO on objective k's pairs; with one objective with pairs and the others rewards
    it is MODPO's loss at every `w`; without margins the linear combination is `sum_i w_i L_i`.

    Parameters:
        objective_names (`list[str]`):
            One name per objective, in the order of the preference vector `w`. Every objective needs pairs (rows of
            `train_dataset` whose `objective` column names it) or a margin reward (`margin_rewards[name]`).
        conditioning (`str`, *optional*, defaults to `"auto"`):
            How the model is told `w`. `"adapter"`: the LoRA adapter's bottleneck is gated by `w` (Panacea's
            SVD-LoRA: `r - n * preference_rank` shared units, `preference_rank` units per objective scaled by its
            weight; `modpo_trl.conditioning.svd_lora`); the prompt stays as it is. `"prompt"`: a line in the prompt
            ("Preference weights: relevance=0.70, brevity=0.30.", the MOC paper's way). `"both"`: the two at once.
            `"auto"`: `"adapter"` when a LoRA adapter is trained (`peft_config=LoraConfig(...)` or a LoRA
            `PeftModel`), else `"prompt"` (a fully fine-tuned model has no adapter to gate); the trainer writes the
            resolved value back into `args.conditioning`. Under adapter conditioning the saved adapter folder holds
            `preference_lora.json`, and runs only with an explicit `w` (`svd_lora.load_preference_adapter`,
            `svd_lora.apply_preference`).
        preference_rank (`int`, *optional*):
            LoRA units per objective under adapter conditioning (Panacea uses 1); the LoRA rank `r` must be at least
            `n * preference_rank`, the rest are shared. Defaults to `r // n`: each objective its own block, no
            shared units, so that `w = e_k` runs objective k's block alone (measured: with half the units shared,
            the blocks moved the answers too little to follow `w`).
        preference_sampling (`str`, *optional*, defaults to `"grid"`):
            How each example's `w` is drawn, once, when the data set is prepared (seeded by `seed`; an example keeps
            its `w` every epoch, which is what lets reference log-probs be precomputed): `"dirichlet"` draws from
            `Dirichlet(dirichlet_alpha)`, `"grid"` uniformly from the points of a simplex grid with `grid_steps`
            steps (vertices included). Draws are rounded to 2 decimals (the precision of the rendered preference).
        dirichlet_alpha (`float`, *optional*, defaults to `1.0`):
            Concentration: 1 is uniform on the simplex, < 1 favours the vertices, > 1 the centre.
        grid_steps (`int`, *optional*, defaults to `4`):
            Grid resolution for `"grid"` (entries in {0, 1/steps, ..., 1}; steps dividing 100 keep points exact).
        preference_augmentation (`int`, *optional*, defaults to `2`):
            Copies of every pair, each under its own preference (`"grid"`: distinct grid points, so with as many
            copies as grid points every pair is seen at every point, the vertices included). The copies of a pair
            are kept in the same batch (in order, shuffled by pair), which is what `control_loss="paired"` compares.
            The training set grows by this factor: an epoch is that many times longer.
        heldout_preferences (`list[list[float]]`, *optional*):
            Preferences never trained on, to measure generalisation: grid points equal to one are excluded; Dirichlet
            draws within L1 distance `heldout_radius` of one are drawn again.
        heldout_radius (`float`, *optional*, defaults to `0.05`):
            L1 radius of the held-out neighbourhoods for `"dirichlet"`.
        moo_solver (`str`, *optional*, defaults to `"linear"`):
            How the per-objective losses `L_i` and the control loss `control_weight * C` are combined each step.
            `"linear"`: the conditioned-MODPO baseline, `alpha_i` = objective i's share of the batch's pair weight,
            plus `control_weight * C`. `"mgda"` (MOC's min-norm solver "at the policy level", the paper's): the
            gradient of each loss with respect to the batch's per-sequence policy log-probs
            `[log pi(chosen); log pi(rejected)]` (a `(2B,)` tensor every loss is a function of) is taken with
            `torch.autograd.grad`, the min-norm combination of these `k` small vectors is found
            (`modpo_trl.trainers.mgda`: closed form for 2, exact up to 8, Frank-Wolfe for more), and `sum_i alpha_i loss_i` is back-propagated once: no extra pass through
            the model. This is MGDA-UB (Sener & Koltun): min-norm on gradients of a shared intermediate tensor,
            which bounds the parameter-space problem but is not guaranteed to be a common descent direction for the
            parameters. It also ignores the preference between objectives: their losses are computed on disjoint
            pairs, so their log-prob gradients are orthogonal and min-norm gives each a share proportional to
            `1 / ||g_i||`, whatever `w` says. `"weighted_mgda"`: the same solve on the gradients divided by their
            linear coefficients (`mgda.descent_coefficients(weights=...)`: objective shares and `control_weight`):
            every loss then decreases at a rate of at least its share, non-conflicting objectives keep exactly
            their preference shares, and conflicts (between an objective and `C`, which share pairs) are resolved
            in favour of the loss furthest behind its share. Losses without signal in a batch (no weighted pairs;
            no control signal) are left out. Evaluation losses always use the linear combination, so runs with
            any solver compare.
        mgda_normalization (`str`, *optional*, defaults to `"l2"`):
            `"l2"`: the solver sees unit gradients and its coefficients are rescaled to the raw losses
            (`modpo_trl.trainers.mgda.descent_coefficients`), so the update direction does not depend on the losses' scales
            (`C` is scale-free and its gradient is large while the achieved rewards barely differ, early in
            training). `"none"`: plain MGDA, where the loss with the smallest gradient takes most of the weight.
        control_loss (`str`, *optional*, defaults to `"paired"`):
            The controllability loss `C`, which asks each objective's achieved implicit reward margin `m_b` (on its
            own pairs; for an objective with only a reward, on every pair, oriented by the sign of `dr_j`) to rise
            with that objective's weight. `"zscore"` (MOC's MSE between achieved rewards and the preference): the
            mean over objectives of `MSE(zscore(m), zscore(w_i))` across the batch, `2 (1 - Pearson r)`; it compares
            different pairs, and with two rows of an objective it sees only their order. `"paired"`: for every two
            copies `a`, `b` of the SAME pair in the batch (`preference_augmentation >= 2`) and every objective
            with `w_a,i > w_b,i`, the logistic loss `-log sigmoid(s (m_a - m_b))` (`s` = 1, or the sign of
            `dr_j`), averaged with weights `w_a,i - w_b,i`: a differentiable Kendall concordance between weight and
            margin on identical content, on DPO's logit scale.
        control_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the controllability loss `C`. `moo_solver="linear"` with `control_weight=0` is plain
            preference-conditioned MODPO.
        mgda_max_iter (`int`, *optional*, defaults to `250`):
            Frank-Wolfe iterations (more than 8 losses; fewer are solved exactly). Stopping here before `mgda_tol`
            is reached warns with the duality gap.
        mgda_tol (`float`, *optional*, defaults to `1e-10`):
            Frank-Wolfe stops when its duality gap is below this.
        margin_scoring, margin_normalization, margin_batch_size, use_score_cache, score_cache_dir:
            As in [`MODPOConfig`], for the margin rewards of objectives without pairs (by default scored once before
            training, cached by content and shared with MODPO runs on the same pairs).

    `loss_type` (and a list of them with `loss_weights`) may be any of TRL's loss types that is a function of one
    pair's implicit rewards, `PAIR_LOSS_TYPES`: each pair's loss is TRL's formula on MODPO's margin-adjusted rewards
    (`-log sigmoid(z_b)` above for `"sigmoid"`), so that it can be weighted by the pair's own preference. Not
    supported: `"aot"` and `"aot_unpaired"` (they sort across the batch), `"sft"` (a batch mean of token
    log-likelihoods), and `f_divergence_type` other than `"reverse_kl"` (as in [`MODPOConfig`] with margins).

    Logged metrics: TRL's `rewards/*` (`beta` x log-ratios, before margins), `logps/*` and `entropy`, plus
    `moc/loss_<name>` (L_i), `moc/control` (C, unweighted), `moc/alpha_<name>` and `moc/alpha_control` (the
    coefficients each loss was back-propagated with; 0 for a loss left out of a batch and for objectives without
    pairs, which have no loss of their own).
    """

    objective_names: list[str] | None = field(
        default=None, metadata={"help": "Names of the objectives, in the order of the preference vector."}
    )
    conditioning: str = field(
        default="auto",
        metadata={
            "help": "How w enters the model: 'adapter' (SVD-LoRA), 'prompt', 'both', or 'auto' (adapter with LoRA)."
        },
    )
    preference_rank: int | None = field(
        default=None,
        metadata={
            "help": "LoRA units per objective under adapter conditioning (default: r // n, none shared)."
        },
    )
    preference_sampling: str = field(
        default="grid", metadata={"help": "How training preferences are drawn: 'grid' or 'dirichlet'."}
    )
    dirichlet_alpha: float = field(default=1.0, metadata={"help": "Dirichlet concentration (1: uniform)."})
    grid_steps: int = field(
        default=4, metadata={"help": "Steps of the simplex grid for preference_sampling='grid'."}
    )
    preference_augmentation: int = field(
        default=2, metadata={"help": "Copies of every pair, each under its own preference."}
    )
    heldout_preferences: list[list[float]] | None = field(
        default=None, metadata={"help": "Preferences never trained on (generalisation is measured on them)."}
    )
    heldout_radius: float = field(
        default=0.05, metadata={"help": "L1 radius around held-out preferences that Dirichlet draws avoid."}
    )
    moo_solver: str = field(
        default="linear",
        metadata={"help": "How losses are combined: 'linear', 'weighted_mgda' or 'mgda'."},
    )
    control_loss: str = field(
        default="paired", metadata={"help": "Controllability loss: 'paired' (copies of a pair) or 'zscore'."}
    )
    control_weight: float = field(default=1.0, metadata={"help": "Weight of the controllability loss."})
    mgda_normalization: str = field(
        default="l2",
        metadata={"help": "Gradients given to the MGDA solver: 'l2' (unit length) or 'none' (raw)."},
    )
    mgda_max_iter: int = field(
        default=250, metadata={"help": "Frank-Wolfe iterations for more than 8 losses."}
    )
    mgda_tol: float = field(default=1e-10, metadata={"help": "Frank-Wolfe duality-gap tolerance."})
    margin_scoring: str = field(
        default="precompute",
        metadata={
            "help": "When margin rewards are scored: 'precompute' (once, cached) or 'per_batch' (each step)."
        },
    )
    margin_normalization: str = field(
        default="none", metadata={"help": "How margin rewards are scaled: 'none' (raw) or 'zscore'."}
    )
    margin_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size for scoring margin rewards; defaults to per_device_eval_batch_size."},
    )
    use_score_cache: bool = field(
        default=True, metadata={"help": "Cache margin rewards by content fingerprint."}
    )
    score_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache directory; defaults to $MODPO_TRL_CACHE or ~/.cache/modpo_trl."},
    )

    def __post_init__(self):
        super().__post_init__()
        names = self.objective_names
        if not names or isinstance(names, str) or len(names) < 2:
            raise ValueError(
                f"objective_names={names!r} must list at least 2 objectives, in the order of the preference vector"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"objective_names={list(names)} must be unique")
        _check_choice("preference_sampling", self.preference_sampling, PREFERENCE_SAMPLINGS)
        _check_choice("moo_solver", self.moo_solver, MOO_SOLVERS)
        _check_choice("conditioning", self.conditioning, CONDITIONINGS)
        _check_choice("control_loss", self.control_loss, CONTROL_LOSSES)
        _check_choice("mgda_normalization", self.mgda_normalization, MGDA_NORMALIZATIONS)
        check_margin_fields(self)
        _check_number("dirichlet_alpha", self.dirichlet_alpha, strict=True)
        _check_number("heldout_radius", self.heldout_radius, strict=False)
        _check_number("control_weight", self.control_weight, strict=False)
        _check_number("mgda_tol", self.mgda_tol, strict=True)
        for name in ("grid_steps", "mgda_max_iter", "preference_rank", "preference_augmentation"):
            value = getattr(self, name)
            if name == "preference_rank" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        self.heldout_preferences = [
            check_preference(w, len(names), f"heldout_preferences[{i}]")
            for i, w in enumerate(self.heldout_preferences or [])
        ]
        unsupported = [t for t in self.loss_type if t not in PAIR_LOSS_TYPES]
        if unsupported:
            raise ValueError(
                f"loss_type={self.loss_type} is not supported by MOC: {unsupported} are not functions of one pair's "
                "implicit rewards (MOC weights each pair by its own preference); valid: "
                + str(list(PAIR_LOSS_TYPES))
            )
        if self.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"f_divergence_type={self.f_divergence_type!r} is not supported by MOC: its margins enter as a shift "
                "of the implicit rewards, which only the reverse KL gives; valid: ['reverse_kl']"
            )
        if self.ld_alpha is not None or self.use_weighting:
            raise ValueError(
                f"ld_alpha={self.ld_alpha!r} / use_weighting={self.use_weighting!r} are not supported by MOC; "
                "valid: ld_alpha=None, use_weighting=False"
            )


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; valid: {list(valid)}")


def _check_number(name: str, value: float, strict: bool) -> None:
    """`value` must be a finite number, `> 0` when `strict`, else `>= 0`."""
    number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not number or value < 0 or (strict and value == 0):
        raise ValueError(f"{name}={value!r} must be a finite number {'> 0' if strict else '>= 0'}")
