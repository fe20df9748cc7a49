"""A request's texts (or token ids) to token sequences, by the rules every text task shares: prompts, bounded
tokenisation, the per-input limit (the model's, or the request's max_tokens) and length policy (refuse,
truncate from either end keeping the special tokens, or chunk: engine/chunking.py), the request's input and
token limits, and admission (rate limits). The embedding and sparse tasks both use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..backends.base import BackendInfo
from ..errors import ErrorKind, ServiceError
from .chunking import Windows, plan_windows
from .core import EngineCore, invalid_unicode
from .options import EngineOptions
from .prompts import apply_prompt
from .token_ids import check_token_ids, with_special_tokens
from .tokenize import TokenLimitError, tokenize_bounded
from .truncation import keep_end, keep_start
from .types import EmbedRequest

__all__ = ["LONG_INPUTS", "Prepared", "enforce_lengths", "input_limit", "long_input_policy", "prepare_ids",
           "prepare_inputs", "prepare_texts"]

LONG_INPUTS = ("refuse", "truncate", "chunk")


@dataclass
class Prepared:
    """A request's model inputs: `seqs` in order (an input to chunk is empty there, its ids in `windows`),
    the tokens the model will embed, and which inputs were cut."""

    seqs: list[list[int]]
    total: int
    truncated: list[int] = field(default_factory=list)
    windows: dict[int, Windows] = field(default_factory=dict)


def long_input_policy(request: EmbedRequest, options: EngineOptions, *, chunkable: bool = True) -> str:
    """refuse, truncate or chunk, for this request: its `long_inputs`, else its `truncate` (true: truncate;
    false: not cut, so refused unless the server chunks, which cuts nothing), else the server's setting."""
    asked = request.long_inputs
    if asked is not None and asked not in LONG_INPUTS:
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"long_inputs must be one of {', '.join(LONG_INPUTS)}, "
                           f"got '{asked[:40]}'", param="long_inputs")
    if asked is not None and request.truncate and asked != "truncate":
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"long_inputs '{asked}' contradicts truncate: send one of "
                           "them", param="long_inputs")
    if asked is None:
        if request.truncate is None:
            asked = options.long_inputs
        else:
            asked = "truncate" if request.truncate else ("chunk" if options.long_inputs == "chunk" else "refuse")
    if asked == "chunk" and not chunkable:
        if request.long_inputs == "chunk":
            raise ServiceError(ErrorKind.INVALID_REQUEST, "long_inputs 'chunk' applies to dense embeddings only",
                               param="long_inputs")
        return "refuse"
    return asked


async def prepare_inputs(core: EngineCore, request: EmbedRequest, info: BackendInfo, deadline: float, *,
                         chunkable: bool = False) -> Prepared:
    """Prompt, tokenise, check the limits, plan the windows of inputs to chunk (`chunkable` tasks only) and
    admit (rate limits)."""
    options = core.options
    count = request.count
    if count > options.max_inputs_per_request:
        raise ServiceError(ErrorKind.INVALID_REQUEST,
                           f"too many inputs: {count}; at most {options.max_inputs_per_request} "
                           "per request", param="input")
    policy = long_input_policy(request, options, chunkable=chunkable)
    limit, limit_name = input_limit(request, info, options)
    # Chunking reads the whole of an input, up to its own bound; the others stop counting at the limit.
    most, most_name = (options.max_chunked_input_tokens, "max_chunked_input_tokens") if policy == "chunk" else (
        limit, limit_name)
    if request.texts is not None:
        texts = apply_prompt(request.texts, instruction=request.instruction, prompt_name=request.prompt_name,
                             prompts=info.prompts, default_prompt_name=info.default_prompt_name)
        try:
            seqs = await tokenize_bounded(
                texts, core.backend.tokenize, core.tokenizer_pool, limit=most, truncate=policy == "truncate",
                max_total=options.max_request_tokens,
                specials=len(info.special_prefix) + len(info.special_suffix), deadline=deadline,
                keep_end=request.truncate_start, limit_name=most_name,
                join=(len(info.special_prefix), len(info.special_suffix)) if policy == "chunk" else None)
        except TokenLimitError as exc:
            if request.charge_refused is not None:  # a refusal is not free: its tokens count (lower bound)
                request.charge_refused(exc.tokens_at_least)
            raise
        except UnicodeError as exc:
            raise invalid_unicode(exc, "input") from None
    else:
        seqs = prepare_ids(request.token_ids or [], info, flat=request.token_ids_flat)
    prepared = Prepared(seqs, 0)
    try:
        seqs = enforce_lengths(seqs, info, options, policy == "truncate", limit=(limit, limit_name),
                               cut_start=request.truncate_start, cut=prepared.truncated,
                               chunk_limit=options.max_chunked_input_tokens if policy == "chunk" else None)
    except ServiceError:
        if request.charge_refused is not None:
            request.charge_refused(sum(len(ids) for ids in seqs))
        raise
    over = [index for index, ids in enumerate(seqs) if len(ids) > limit]
    if over:
        prepared.windows = await plan_windows(core, request, info, seqs, over, limit, deadline)
    total = sum(len(s) for s in seqs) + sum(item.tokens for item in prepared.windows.values())
    if total > options.max_request_tokens and request.charge_refused is not None:
        request.charge_refused(total)
    if total > options.max_request_tokens:
        raise ServiceError(ErrorKind.INVALID_REQUEST,
                           f"request has {total} tokens in all; at most {options.max_request_tokens} "
                           "per request: split it", param="input")
    if request.admit is not None:
        request.admit(total)
    prepared.total = total
    return prepared


def prepare_texts(core: EngineCore, texts: list[str], info: BackendInfo, *, instruction: str | None = None,
                  prompt_name: str | None = None, truncate: bool | None = None) -> list[list[int]]:
    """Prompt, tokenise and apply the length policy as prepare_inputs does, synchronously and without the
    request limits: for bulk jobs, which form their batches themselves so that a chunk's vectors never depend
    on timing (a resumed run must equal an uninterrupted one, bit for bit)."""
    prompted = apply_prompt(texts, instruction=instruction, prompt_name=prompt_name, prompts=info.prompts,
                            default_prompt_name=info.default_prompt_name)
    try:
        seqs = core.backend.tokenize(prompted)
    except UnicodeError as exc:
        raise invalid_unicode(exc, "input") from None
    return enforce_lengths(seqs, info, core.options, truncate)


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
                    limit: tuple[int, str] | None = None, cut_start: bool = False, cut: list[int] | None = None,
                    chunk_limit: int | None = None) -> list[list[int]]:
    """The length policy: an empty input is refused; an over-long one refused, or cut when truncating (its
    index added to `cut`), or left whole for chunking when `chunk_limit` is given (refused above that)."""
    most, limit_name = limit or (min(options.max_model_len, info.max_model_len), "this model's limit")
    truncating = options.truncate if truncate is None else truncate
    for index, ids in enumerate(seqs):
        if not ids:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"input[{index}] is empty", param="input")
        if len(ids) <= most:
            continue
        if chunk_limit is not None and len(ids) <= chunk_limit:
            continue
        if chunk_limit is not None or not truncating:
            most_here, name = (chunk_limit, "max_chunked_input_tokens") if chunk_limit is not None else (
                most, limit_name)
            raise ServiceError(ErrorKind.INVALID_REQUEST,
                               f"input[{index}] has {len(ids)} tokens, more than {name} of "
                               f"{most_here}; shorten it or send \"truncate\": true", param="input",
                               code="context_length_exceeded")
        seqs[index] = keep_end(ids, most, info) if cut_start else keep_start(ids, most, info)
        if cut is not None:
            cut.append(index)
    return seqs
