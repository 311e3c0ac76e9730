"""modpo_trl: RL-free multi-objective preference optimisation for Hugging Face TRL."""

import importlib

__version__ = "0.1.0"

# Lazy exports: `import modpo_trl.pareto` (or the CLI's --dry-run) should not pay for importing TRL.
_EXPORTS = {
    "MODPOConfig": "modpo_config",
    "MODPOTrainer": "modpo_trainer",
    "RewardSource": "rewards",
    "FunctionReward": "rewards",
    "RewardModel": "rewards",
    "ImplicitReward": "rewards",
    "ColumnReward": "rewards",
    "MOCConfig": "moc_config",
    "MOCTrainer": "moc_trainer",
    "DPAConfig": "dpa_config",
    "DPATrainer": "dpa_trainer",
    "MultiObjectiveReward": "dpa_trainer",
    "train_reward_model": "reward_modeling",
    "render_preference": "preference",
    "render_direction": "directions",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
