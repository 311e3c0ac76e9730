"""TRL trainers and their configs: MODPO, MOC, DPA, and the min-norm solver. They know nothing of recipes,
runs or reports."""
