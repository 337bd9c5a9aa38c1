"""Benchmarks of segnn_jax (throughput, comparison with other implementations)."""
