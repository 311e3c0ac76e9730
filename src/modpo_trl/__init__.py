"""modpo_trl: RL-free multi-objective preference optimisation for Hugging Face TRL."""

import importlib
import logging
import warnings

__version__ = "0.1.0"

# bitsandbytes' CPU backend, imported by peft on every start, tries to fetch an optional faster CPU kernel for
# 4-bit matmuls from the Hub (the `kernels` package) and logs its failure (offline, or an unverified publisher)
# as a warning, with a second notice from `kernels` in offline mode. modpo_trl never runs 4-bit on a CPU (4-bit
# needs CUDA), so nobody can act on them: both are dropped, every other bitsandbytes message (CUDA setup) stays.
CPU_KERNEL_NOTICES = ("Failed to load CPU gemm_4bit_forward", "kernels-community/quantization-bitsandbytes")


class _CpuKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in CPU_KERNEL_NOTICES)


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).addFilter(_CpuKernelNotice())
# peft and TRL still call transformers' deprecated `is_gradient_checkpointing` whenever they wrap a model.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

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
