"""zhgpt-jax: train a Chinese GPT from scratch in JAX/Flax (README.md)."""

__version__ = '0.1.0'   # the one place: pyproject.toml, `zhgpt --version` and exports read it
