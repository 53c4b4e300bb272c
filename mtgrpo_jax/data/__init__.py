"""Per-task prompt streams (grain) and batch construction (the ratio-preserving sampler of the
paper's Algorithm 2 and the baselines' plain samplers). Never imports models, rollout or training."""

from mtgrpo_jax.data.sampler import (
    DynamicSampler,
    GenerateFn,
    PlainSampler,
    RatioPreservingSampler,
    SampleResult,
    largest_remainder,
    make_sampler,
)
from mtgrpo_jax.data.taskset import TaskSet

__all__ = [
    "DynamicSampler",
    "GenerateFn",
    "PlainSampler",
    "RatioPreservingSampler",
    "SampleResult",
    "TaskSet",
    "largest_remainder",
    "make_sampler",
]
