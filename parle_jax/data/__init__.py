"""Datasets for Parle; the code is in :mod:`parle_jax.data.datasets` for now."""

from parle_jax.data.datasets import *  # noqa: F401,F403
