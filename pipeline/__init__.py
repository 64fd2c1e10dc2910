"""linearize pipeline: stages, planner, cache, run directory, data, evaluation, export, CLI."""
