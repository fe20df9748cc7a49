"""Tokenisation that one request cannot monopolise, with limits checked as the tokens come in.

Tokenising a whole request in one call on the tokenizer thread let one client stall everyone: a single
15.6 MB input took 25 s to be refused as too long, and every other request waited behind it. Here:

- a request is tokenised in chunks (at most `_CHUNK_TEXTS` texts and `_CHUNK_CHARS` characters each), one
  chunk at a time on the shared thread, so requests take turns and a small one waits for at most one chunk;
- a text longer than a chunk is first *counted* slice by slice (slices cut at whitespace, where tokenizers
  split anyway, so the counts add up): once it is known to be over the limit it is refused (or, when
  truncating, only the prefix that covers the limit is tokenised), without tokenising the rest;
- the running total is checked after each chunk against `max_request_tokens`;
- between chunks the request's deadline is checked and a cancelled request (its client hung up) stops.

Refusals carry a lower bound of the request's tokens, which the caller charges to its token rate limit.
The fast path (a request of short texts) is one tokenizer call; a chunk of at most `_INLINE_CHARS`
characters (a short query ~40 µs, 512 characters ~0.25 ms) runs on the event loop itself: the hop to the
tokenizer thread and back cost more than the work, on every single-text request (backends' tokenizers are
thread-safe).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor

from ..errors import ErrorKind, ServiceError

__all__ = ["TokenLimitError", "tokenize_bounded"]

_CHUNK_TEXTS = 64
_CHUNK_CHARS = 32_768  # about 10-40 ms of a fast tokenizer on one core
_SLICE_CHARS = 16_384
_INLINE_CHARS = 512  # a chunk this small is tokenised on the event loop: ~0.3 ms at most (MiniLM)
_WHITESPACE = (" ", "\n", "\t", "\r")

Tokenize = Callable[[Sequence[str]], list[list[int]]]
Runner = Callable[[Sequence[str]], Awaitable[list[list[int]]]]


class TokenLimitError(ServiceError):
    """A length refusal that knows at least how many tokens the request had (for the token bucket)."""

    def __init__(self, message: str, *, tokens_at_least: int, code: str | None = None) -> None:
        super().__init__(ErrorKind.INVALID_REQUEST, message, param="input", code=code)
        self.tokens_at_least = tokens_at_least


def _cut(text: str, start: int) -> int:
    """End of the slice from `start`: at most _SLICE_CHARS on, just before a whitespace when there is one."""
    end = start + _SLICE_CHARS
    if end >= len(text):
        return len(text)
    cut = max(text.rfind(ch, start + 1, end) for ch in _WHITESPACE)
    return cut if cut > start else end


async def tokenize_bounded(
    texts: Sequence[str], tokenize: Tokenize, pool: Executor, *, limit: int, truncate: bool,
    max_total: int, specials: int, deadline: float, keep_end: bool = False, limit_name: str = "this model's limit",
    join: tuple[int, int] | None = None,
) -> list[list[int]]:
    """Token ids of `texts`, refusing (TokenLimitError) as soon as a limit is known to be exceeded.

    `limit`: tokens per text (with `truncate`, longer texts are cut later, by the engine); `specials`: how
    many special tokens the tokenizer adds to each text (not counted twice when counting slices); `keep_end`:
    truncation will keep a text's end (Cohere's truncate START), so a long text is counted from its end;
    `limit_name`: what refusals call the limit; `join` (chunking, whose limit is far above a slice): a long
    text's ids are its slices' ids joined (the special tokens, `join` = (before, after), kept once), not a
    second tokenisation of the whole text, whose encoding held ~160 MB per MB of text at its peak.
    """
    loop = asyncio.get_running_loop()

    async def run(batch: Sequence[str]) -> list[list[int]]:
        if time.monotonic() > deadline:
            raise ServiceError(ErrorKind.TIMEOUT, "request did not finish within its time limit (tokenising)",
                               code="timeout")
        if sum(len(text) for text in batch) <= _INLINE_CHARS:
            return tokenize(batch)
        return await loop.run_in_executor(pool, tokenize, batch)

    out: list[list[int]] = []
    total = 0
    index = 0
    while index < len(texts):
        text = texts[index]
        if len(text) > _CHUNK_CHARS:
            ids = await _long_text(text, index, run, limit=limit, truncate=truncate, specials=specials,
                                   total=total, keep_end=keep_end, limit_name=limit_name, join=join)
            chunk = [ids]
        else:
            end, chars = index, 0
            while end < len(texts) and end - index < _CHUNK_TEXTS and len(texts[end]) <= _CHUNK_CHARS:
                chars += len(texts[end])
                if chars > _CHUNK_CHARS and end > index:
                    break
                end += 1
            chunk = await run(texts[index:end])
            if not truncate and end < len(texts):  # more to come: refuse now rather than after all of it
                for offset, ids in enumerate(chunk):
                    if len(ids) > limit:
                        raise _too_long(index + offset, len(ids), limit, total + sum(len(s) for s in chunk),
                                        exact=True, limit_name=limit_name)
        out.extend(chunk)
        total += sum(len(ids) for ids in chunk)
        index += len(chunk)
        if total > max_total and index < len(texts):  # (once all are in, the engine words the refusal)
            raise TokenLimitError(f"request has more than {total - 1} tokens in all (counted so far); at most "
                                  f"{max_total} per request: split it", tokens_at_least=total)
    return out


def _cut_back(text: str, end: int) -> int:
    """Start of the slice that ends at `end`: _cut's mirror, at most _SLICE_CHARS back, at a whitespace."""
    start = end - _SLICE_CHARS
    if start <= 0:
        return 0
    cut = min((i for i in (text.find(ch, start, end - 1) for ch in _WHITESPACE) if i >= 0), default=-1)
    return cut if cut >= 0 else start


async def _long_text(text: str, index: int, run: Runner, *, limit: int,
                     truncate: bool, specials: int, total: int, keep_end: bool = False,
                     limit_name: str = "this model's limit", join: tuple[int, int] | None = None) -> list[int]:
    """One long text: count it slice by slice until it is over `limit`, else tokenise it whole (or, with
    `join`, join its slices' ids). Slices go from the start, or from the end when truncation keeps the end."""
    counted = 0
    done = 0  # characters counted, from the start (or from the end)
    joined: list[int] = []
    while done < len(text):
        if keep_end:
            end = len(text) - done
            start = _cut_back(text, end)
        else:
            start = done
            end = _cut(text, start)
        ids = await run([text[start:end]])
        done += end - start
        counted += max(0, len(ids[0]) - specials)
        if join is not None:  # (the text's first slice keeps its opening specials, its last its closing ones)
            joined += ids[0][0 if start == 0 else join[0]:len(ids[0]) - (0 if end == len(text) else join[1])]
        if counted + specials > limit + 2:  # (+2: a slice cut inside a word may split it differently)
            if not truncate:
                raise _too_long(index, counted + specials - 2, limit, total + counted, exact=False,
                                limit_name=limit_name)
            # The part counted covers the limit: the engine keeps its first (or last) `limit` tokens.
            part = await run([text[start:] if keep_end else text[:end]])
            return part[0]
    if join is not None:
        return joined
    whole = await run([text])
    return whole[0]


def _too_long(index: int, tokens: int, limit: int, request_tokens: int, *, exact: bool,
              limit_name: str = "this model's limit") -> TokenLimitError:
    how_many = f"{tokens}" if exact else f"more than {tokens}"
    return TokenLimitError(f"input[{index}] has {how_many} tokens, more than {limit_name} of {limit}; "
                           "shorten it or send \"truncate\": true", tokens_at_least=request_tokens,
                           code="context_length_exceeded")
