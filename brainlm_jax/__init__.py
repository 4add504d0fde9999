"""brainlm_jax: BrainLM-style fMRI foundation models in JAX/Flax."""
__version__ = "0.1.0"
