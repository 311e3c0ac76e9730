"""The evaluation tests' faked MODPO sweep (tiny base model, three random LoRA adapters, manifest, recipe)."""

from ..evaluation.test_pipeline import sweep, sweep_template  # noqa: F401 (fixtures)
