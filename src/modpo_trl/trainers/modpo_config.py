from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from ..conditioning.preference import check_preference
from .margins import check_margin_fields


@dataclass
class MODPOConfig(DPOConfig):
    r"""
    Configuration class for the [`MODPOTrainer`]: every [`~trl.DPOConfig`] field plus the ones below. With the default
    `weights=[1.0]` and no margin rewards, `MODPOTrainer` trains exactly as `DPOTrainer` with the same fields.

    MODPO (Zhou et al., 2023, arXiv:2310.03708) trains on the preference pairs of one *target* objective while
    frozen rewards of the other objectives enter the loss as a margin:

        h(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) - sum_{j>=1} weights[j] * r_j(x, y)
        loss    = -log sigmoid((h(x, y_w) - h(x, y_l)) / weights[0])

    Every TRL `loss_type` (and list of them with `loss_weights`) applies: TRL's implicit rewards
    `beta * log(pi / pi_ref)` become MODPO's margin-adjusted rewards `h / weights[0]`. MODPO's theorem covers
    `"sigmoid"`; `docs/modpo.md` says what the margin means for the others. The margin enters centred on each pair,
    `w . (r(y) - (r(y_w) + r(y_l)) / 2)`: a reward is only defined up to an offset, which losses of the reward
    difference never see and the others should not.

    Parameters:
        weights (`list[float]`, *optional*, defaults to `[1.0]`):
            The weighting `w` on the simplex. `weights[0]` belongs to the target objective (the pairs being trained
            on), `weights[1:]` to the margin rewards, in the order of the trainer's `margin_rewards`. Every value must
            be finite and `>= 0`, `weights[0] > 0` (it divides the loss) and the values must sum to 1 (within 1e-6):
            they are not silently renormalised, so the `w` you log is the `w` that was trained.
            `weights=[1.0, 0.0, ...]` is exactly DPO.
        objective_names (`list[str]`, *optional*):
            One name per objective, in the order of `weights`, used in logged metrics (`margin/<name>`). Defaults to
            `"target"` followed by the names of the margin reward sources.
        margin_scoring (`str`, *optional*, defaults to `"precompute"`):
            `"precompute"`: margin rewards are scored once per map-style data set before training (and cached, see
            `use_score_cache`); a streaming `IterableDataset` cannot be scored ahead and is scored per batch.
            `"per_batch"`: every batch is scored inside the training (or evaluation) step and nothing is cached, for
            rewards that must be evaluated afresh each time a pair is seen (stochastic rewards, APIs).
        margin_normalization (`str`, *optional*, defaults to `"none"`):
            `"none"` uses each margin reward on its raw scale, as the MODPO paper does. `"zscore"` divides each
            objective's reward by its standard deviation over the training set (both responses), so that `w`
            compares objectives of different scales; it needs the training set scored ahead (`"precompute"`, a
            map-style `train_dataset`).
        margin_batch_size (`int`, *optional*):
            Batch size for scoring margin rewards. Defaults to `per_device_eval_batch_size`.
        use_score_cache (`bool`, *optional*, defaults to `True`):
            Whether to store margin rewards scored ahead and (with `precompute_ref_log_probs=True`) reference
            log-probs in a content-addressed cache, so every run of a sweep over weightings scores the data once.
            Sources that are not worth caching (`ColumnReward`) are never cached.
        score_cache_dir (`str`, *optional*):
            Where the cache lives. Defaults to `$MODPO_TRL_CACHE`, else `~/.cache/modpo_trl`.

    With margins (a non-zero `weights[1:]`), `f_divergence_type` must be `"reverse_kl"` and `loss_type` must use the
    implicit rewards (not `["sft"]` alone); both are checked here, with the reason.

    Logged metrics: TRL's DPO metrics, where `rewards/*` are MODPO's margin-adjusted rewards `h / weights[0]` (as in
    the reference implementation), plus `margin/<name>`: the mean chosen-minus-rejected difference of each margin
    reward (after normalisation) over the pairs it applies to.
    """

    weights: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={
            "help": "Weighting on the simplex: weights[0] for the target objective, weights[1:] for margins."
        },
    )
    objective_names: list[str] | None = field(
        default=None, metadata={"help": "Names of the objectives, in the order of `weights`."}
    )
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
        default=True,
        metadata={"help": "Cache margin rewards and reference log-probs by content fingerprint."},
    )
    score_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache directory; defaults to $MODPO_TRL_CACHE or ~/.cache/modpo_trl."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_weights(self.weights, "weights")
        if self.objective_names is not None and len(self.objective_names) != len(self.weights):
            raise ValueError(
                f"objective_names has {len(self.objective_names)} entries {self.objective_names} but weights has "
                f"{len(self.weights)}; give one name per weight"
            )
        check_margin_fields(self)
        if any(w > 0 for w in self.weights[1:]):
            if self.f_divergence_type != "reverse_kl":
                raise ValueError(
                    f"f_divergence_type={self.f_divergence_type!r} cannot be used with margin rewards "
                    f"(weights={self.weights}): the margin enters TRL's loss as a shift of the reference log-probs, "
                    "which only the reverse KL turns into MODPO's shift of the implicit rewards (f' of a shifted "
                    "ratio is not f' minus the margin); valid with margins: ['reverse_kl']"
                )
            if set(self.loss_type) == {"sft"}:
                raise ValueError(
                    f"loss_type={self.loss_type} does not use the implicit rewards, so margin rewards "
                    f"(weights={self.weights}) would have no effect; add a preference loss (e.g. ['sigmoid', 'sft']) "
                    "or train without margins (weights=[1.0])"
                )


def check_weights(weights: list[float] | None, field_name: str = "weights") -> list[float]:
    """Validates a MODPO weighting (see `MODPOConfig.weights`) and returns it as floats."""
    if weights is None:
        raise ValueError(f"{field_name} is required: one weight per objective, target first, e.g. [0.5, 0.5]")
    if isinstance(weights, str | bytes) or not hasattr(weights, "__len__") or len(weights) == 0:
        raise ValueError(f"{field_name}={weights!r} must be a non-empty list of numbers, e.g. [0.5, 0.5]")
    values = check_preference(weights, len(weights), field_name)
    if values[0] <= 0:
        raise ValueError(
            f"{field_name}[0]={values[0]} must be > 0: it is the target objective's weight and divides the MODPO loss"
        )
    return values
