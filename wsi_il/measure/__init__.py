"""Measuring the tool: pseudo-feedback experiments, speed benchmarks, and test slides with known truth."""
