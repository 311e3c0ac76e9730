"""Evaluation: generation, scoring, Pareto metrics, plots and the report."""
