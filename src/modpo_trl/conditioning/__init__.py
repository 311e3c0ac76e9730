"""How a preference enters a conditioned model: MOC's weight vector and DPA's direction as prompt text, and MOC's
weight vector inside a LoRA adapter (svd_lora)."""
