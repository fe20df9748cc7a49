"""Optional: read token-id inputs as OpenAI (tiktoken) ids and embed the text they spell.

LangChain's `OpenAIEmbeddings` tokenises with tiktoken's cl100k_base by default and sends the ids, which mean
nothing to another model's vocabulary. With `token_ids_tiktoken = "cl100k_base"` the server decodes such
inputs back to text, so those clients get the same vectors as for the text itself. Off by default: then
token ids are this model's own ids, as in the OpenAI API.
"""

from __future__ import annotations

import os
from typing import Any

from ...engine.token_ids import check_token_ids
from ...engine.types import EmbedRequest
from ...errors import ErrorKind, ServiceError

__all__ = ["TiktokenDecoder"]


class TiktokenDecoder:
    """Decodes token-id inputs with one tiktoken encoding. Loads it at construction (fails fast, clearly)."""

    def __init__(self, encoding_name: str) -> None:
        try:
            import tiktoken
        except ImportError:
            raise RuntimeError("token_ids_tiktoken needs the tiktoken package: pip install tiktoken"
                               ) from None
        try:
            self._encoding: Any = tiktoken.get_encoding(encoding_name)
        except ValueError as exc:  # an unknown name
            raise RuntimeError(f"token_ids_tiktoken: {exc}") from None
        except Exception as exc:  # tiktoken downloads the file when it is not cached: offline, that fails
            where = os.environ.get("TIKTOKEN_CACHE_DIR") or "tiktoken's default cache"
            raise RuntimeError(
                f"token_ids_tiktoken: cannot load '{encoding_name}' from {where} ({type(exc).__name__}); set "
                "TIKTOKEN_CACHE_DIR to a folder holding it (llama-index-core ships cl100k_base in "
                "llama_index/core/_static/tiktoken_cache)") from None
        self.name = encoding_name

    def to_text(self, request: EmbedRequest) -> EmbedRequest:
        """The same request with its token ids replaced by the text they decode to."""
        if request.token_ids is None:
            return request
        check_token_ids(request.token_ids, self._encoding.n_vocab, flat=request.token_ids_flat, vocabulary=self.name)
        texts: list[str] = []
        for index, ids in enumerate(request.token_ids):
            try:
                text = self._encoding.decode(ids, errors="replace")
            except Exception:  # ids inside n_vocab that the encoding does not define
                raise ServiceError(ErrorKind.INVALID_REQUEST,
                                   f"input[{index}] holds ids that {self.name} cannot decode",
                                   param="input", code="invalid_token_id") from None
            if not text:
                raise ServiceError(ErrorKind.INVALID_REQUEST, f"input[{index}] decodes to empty text",
                                   param="input")
            texts.append(text)
        request.texts, request.token_ids = texts, None
        return request
