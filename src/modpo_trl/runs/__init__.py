"""Recipes and the run engine: the recipe schema, data and model loading, one engine (plan, manifest, locks,
atomic adapters, resume) and one small plug-in per method."""
