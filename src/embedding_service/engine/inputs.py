"""A request's texts (or token ids) to token sequences, by the rules every text task shares: prompts, bounded
tokenisation, the per-input limit (the model's, or the request's max_tokens) and length policy (refuse, or
truncate from either end keeping the special tokens), the request's input and token limits, and admission
(rate limits). The embedding and sparse tasks both use it.
"""

from __future__ import annotations

from ..backends.base import BackendInfo
from ..errors import ErrorKind, ServiceError
from .core import EngineCore, invalid_unicode
from .options import EngineOptions
from .prompts import apply_prompt
from .token_ids import check_token_ids, with_special_tokens
from .tokenize import TokenLimitError, tokenize_bounded
from .truncation import keep_end, keep_start
from .types import EmbedRequest

__all__ = ["enforce_lengths", "input_limit", "prepare_ids", "prepare_inputs"]


async def prepare_inputs(core: EngineCore, request: EmbedRequest, info: BackendInfo, deadline: float
                         ) -> tuple[list[list[int]], int]:
    """Prompt, tokenise, check the limits and admit (rate limits): the ids and their token count."""
    options = core.options
    count = request.count
    if count > options.max_inputs_per_request:
        raise ServiceError(ErrorKind.INVALID_REQUEST,
                           f"too many inputs: {count}; at most {options.max_inputs_per_request} "
                           "per request", param="input")
    limit, limit_name = input_limit(request, info, options)
    if request.texts is not None:
        texts = apply_prompt(request.texts, instruction=request.instruction, prompt_name=request.prompt_name,
                             prompts=info.prompts, default_prompt_name=info.default_prompt_name)
        try:
            seqs = await tokenize_bounded(
                texts, core.backend.tokenize, core.tokenizer_pool,
                limit=limit, truncate=options.truncate if request.truncate is None else request.truncate,
                max_total=options.max_request_tokens,
                specials=len(info.special_prefix) + len(info.special_suffix), deadline=deadline,
                keep_end=request.truncate_start, limit_name=limit_name)
        except TokenLimitError as exc:
            if request.charge_refused is not None:  # a refusal is not free: its tokens count (lower bound)
                request.charge_refused(exc.tokens_at_least)
            raise
        except UnicodeError as exc:
            raise invalid_unicode(exc, "input") from None
    else:
        seqs = prepare_ids(request.token_ids or [], info, flat=request.token_ids_flat)
    try:
        seqs = enforce_lengths(seqs, info, options, request.truncate, limit=(limit, limit_name),
                               cut_start=request.truncate_start)
    except ServiceError:
        if request.charge_refused is not None:
            request.charge_refused(sum(len(ids) for ids in seqs))
        raise
    total = sum(len(s) for s in seqs)
    if total > options.max_request_tokens and request.charge_refused is not None:
        request.charge_refused(total)
    if total > options.max_request_tokens:
        raise ServiceError(ErrorKind.INVALID_REQUEST,
                           f"request has {total} tokens in all; at most {options.max_request_tokens} "
                           "per request: split it", param="input")
    if request.admit is not None:
        request.admit(total)
    return seqs, total


def prepare_ids(token_ids: list[list[int]], info: BackendInfo, *, flat: bool = False) -> list[list[int]]:
    """Token-id inputs, checked against the vocabulary, with the special tokens text would get."""
    # LangChain's OpenAIEmbeddings sends OpenAI (tiktoken) ids by default: the usual cause of a bad id.
    check_token_ids(token_ids, info.vocab_size, flat=flat, vocabulary="this model's vocabulary",
                    hint="; token ids must come from this model's tokenizer (LangChain: set "
                         "check_embedding_ctx_length=False to send text)")
    return [with_special_tokens(ids, info.special_prefix, info.special_suffix) for ids in token_ids]


def input_limit(request: EmbedRequest, info: BackendInfo, options: EngineOptions) -> tuple[int, str]:
    """The tokens one input may have, and what refusals call that limit: the model's, or max_tokens."""
    limit = min(options.max_model_len, info.max_model_len)
    if request.max_tokens is None:
        return limit, "this model's limit"
    if not 1 <= request.max_tokens <= limit:
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"max_tokens must be between 1 and this model's limit "
                           f"of {limit}, got {request.max_tokens}", param="max_tokens")
    return request.max_tokens, "max_tokens"


def enforce_lengths(seqs: list[list[int]], info: BackendInfo, options: EngineOptions, truncate: bool | None, *,
                    limit: tuple[int, str] | None = None, cut_start: bool = False) -> list[list[int]]:
    """The length policy: an empty input is refused; an over-long one refused, or cut when truncating."""
    most, limit_name = limit or (min(options.max_model_len, info.max_model_len), "this model's limit")
    cut = options.truncate if truncate is None else truncate
    for index, ids in enumerate(seqs):
        if not ids:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"input[{index}] is empty", param="input")
        if len(ids) > most:
            if not cut:
                raise ServiceError(ErrorKind.INVALID_REQUEST,
                                   f"input[{index}] has {len(ids)} tokens, more than {limit_name} of "
                                   f"{most}; shorten it or send \"truncate\": true", param="input",
                                   code="context_length_exceeded")
            seqs[index] = keep_end(ids, most, info) if cut_start else keep_start(ids, most, info)
    return seqs
