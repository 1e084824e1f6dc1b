"""Sampling: the public sampler (sampler.py), the rollout engine behind it (engine.py: slots, continuous batching),
its KV cache on device (cache.py) and the token-selection methods (select.py)."""

from s2d_jax.sampling.sampler import Job, Sample, Sampler
from s2d_jax.sampling.select import Greedy, Sampling

__all__ = ["Greedy", "Job", "Sample", "Sampler", "Sampling"]
