"""Readers and generators of data sets. They return NumPy arrays and know nothing about models.

Import the module you need, e.g. ``from segnn_jax.datasets import nbody``; nothing is imported here
so that loading one data set never pulls in the dependencies of another.
"""
