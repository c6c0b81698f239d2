"""Exploring the design space: sweeps, evaluation of finished runs, reports, and the cluster planner."""
