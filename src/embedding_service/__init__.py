"""embedding-service: an OpenAI-compatible text-embedding server on vLLM and transformers."""

__version__ = "0.1.0"

__all__ = ["__version__"]
