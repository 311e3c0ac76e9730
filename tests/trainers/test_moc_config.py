"""MOCConfig rejects DPOConfig fields its loss does not read, instead of training as if they were not set."""

import pytest

from modpo_trl import MOCConfig

COMMON = dict(report_to="none", use_cpu=True, bf16=False, objective_names=["a", "b"])


@pytest.mark.parametrize("field,value", [("label_smoothing", 0.1), ("loss_weights", [1.0])])
def test_dpo_loss_fields_moc_does_not_use_are_rejected(field, value, tmp_path):
    with pytest.raises(
        ValueError, match=rf"{field}=.*are not used by MOC; valid: label_smoothing=0.0, loss_weights=None"
    ):
        MOCConfig(output_dir=str(tmp_path), **COMMON, **{field: value})
    MOCConfig(output_dir=str(tmp_path), **COMMON)  # their defaults are fine
