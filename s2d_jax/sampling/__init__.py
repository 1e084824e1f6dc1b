"""Sampling: the batched on-device sampler and its token-selection methods."""

from s2d_jax.sampling.sampler import Sample, Sampler
from s2d_jax.sampling.select import Greedy, Sampling

__all__ = ["Greedy", "Sample", "Sampler", "Sampling"]
