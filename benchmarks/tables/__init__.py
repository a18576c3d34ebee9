"""Builders of the generated results tables (``python -m benchmarks.results_table``): formatting
and sources (``fmt``), the pruning protocol (``protocol``), the other benchmarks (``others``)."""
