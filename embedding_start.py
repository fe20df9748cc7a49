"""Start the service as the spec describes: `python embedding_start.py` (flags work here too)."""

import sys

from config.embedding_config import EmbeddingConfig
from embedding_service.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]], config_cls=EmbeddingConfig))
