"""balcap: balanced multi-objective RL for multimodal LLM image captioners, in JAX/Flax."""

__version__ = "0.1.0"
