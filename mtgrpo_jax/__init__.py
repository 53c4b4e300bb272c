"""mtgrpo_jax: Multi-Task GRPO (arXiv 2602.05547) in JAX / Flax NNX."""

__version__ = "0.1.0"
