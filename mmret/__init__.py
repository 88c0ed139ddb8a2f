"""mmret: multimodal retrieval models in JAX/Flax."""
