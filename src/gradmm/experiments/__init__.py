"""Experiments: grids of (task, method, seed) cells, the method registry, typed results, reports."""
