"""modpo_trl: RL-free multi-objective preference optimisation for Hugging Face TRL."""

import importlib

__version__ = "0.1.0"

# Lazy exports: `import modpo_trl.evaluation.pareto` (or the CLI's --help) should not pay for importing TRL.
_EXPORTS = {
    "MODPOConfig": "trainers.modpo_config",
    "MODPOTrainer": "trainers.modpo_trainer",
    "MOCConfig": "trainers.moc_config",
    "MOCTrainer": "trainers.moc_trainer",
    "DPAConfig": "trainers.dpa_config",
    "DPATrainer": "trainers.dpa_trainer",
    "RewardSource": "rewards.sources",
    "FunctionReward": "rewards.sources",
    "RewardModel": "rewards.sources",
    "ImplicitReward": "rewards.sources",
    "ColumnReward": "rewards.sources",
    "MultiObjectiveReward": "rewards.vector",
    "train_reward_model": "rewards.modeling",
    "render_preference": "conditioning.preference",
    "render_direction": "conditioning.directions",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
