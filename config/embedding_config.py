"""The spec's configuration class. Edit the defaults below, or set EMBEDDING_* variables, or pass flags.

Every field, its default and its variable are listed in the README ("Configuration").
"""

from embedding_service.config import EmbeddingConfig as _BaseConfig


class EmbeddingConfig(_BaseConfig):
    # Uncomment and edit to change a default, e.g.:
    # model_name: str = "Qwen/Qwen3-Embedding-0.6B"
    # model_path: str | None = "/models/Qwen3-Embedding-0.6B"
    # gpu_memory_utilization: float = 0.4
    # max_model_len: int = 3072
    # port: int = 8890
    pass


__all__ = ["EmbeddingConfig"]
