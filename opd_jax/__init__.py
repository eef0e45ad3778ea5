"""opd-jax: on-policy distillation of language models in JAX."""
