"""API keys: `Authorization: Bearer KEY`, checked as a small pure ASGI middleware.

Only SHA-256 digests of the keys are kept in memory. A presented key is hashed and compared with
`hmac.compare_digest` against *every* configured digest, with no early exit, so the time taken depends
neither on how much of a key is right nor on which key matched. Keys are never logged; a key is known
to the rest of the service (rate limits, logs) only by a short prefix of its digest.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from ...config import UNUSABLE_KEY, EmbeddingConfig, usable_api_key
from ...errors import ErrorKind, ServiceError, send_error
from .access import CLIENT_ID_KEY, is_exempt
from .ratelimit import RateLimiter

__all__ = [
    "CLIENT_ID_KEY",
    "ApiKeyMiddleware",
    "ApiKeyVerifier",
    "GuardOptions",
    "is_exempt",
    "key_digest",
    "load_key_digests",
]

log = logging.getLogger("embedding_service")

_REALM = 'Bearer realm="embedding-service"'
_HASH_PREFIX = "sha256:"


@dataclass(frozen=True)
class GuardOptions:
    """API keys and rate limits, from the settings (defaults live in EmbeddingConfig only)."""

    api_keys: tuple[str, ...]
    api_key_file: str | None
    exempt_paths: tuple[str, ...]
    rate_limit_rpm: int
    rate_limit_tpm: int
    auth_failures_per_minute: int

    @classmethod
    def from_config(cls, settings: EmbeddingConfig) -> GuardOptions:
        return cls(api_keys=tuple(settings.api_keys), api_key_file=settings.api_key_file,
                   exempt_paths=tuple(settings.auth_exempt_paths), rate_limit_rpm=settings.rate_limit_rpm,
                   rate_limit_tpm=settings.rate_limit_tpm, auth_failures_per_minute=settings.auth_failures_per_minute)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def load_key_digests(keys: Iterable[str], key_file: str | None) -> list[bytes]:
    """Digests of the configured keys: plain keys from `keys`, plain keys or `sha256:HEX` lines from the file.

    A hash must carry the `sha256:` prefix: a bare 64-hex-digit line is a key (`openssl rand -hex 32`
    makes exactly such keys), so there is no guessing which one a line is.
    """
    digests = [key_digest(key.strip()) for key in keys if key.strip()]
    if key_file:
        text = Path(key_file).read_text(encoding="utf-8")
        from_file = 0
        for number, line in enumerate(text.splitlines(), 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            from_file += 1
            if entry.lower().startswith(_HASH_PREFIX):
                digests.append(_parse_hex_digest(entry[len(_HASH_PREFIX):].strip(), key_file, number))
            else:
                if not usable_api_key(entry):
                    raise ValueError(f"api_key_file {key_file}:{number}: {UNUSABLE_KEY}")
                digests.append(key_digest(entry))
        if not from_file:  # fail closed: a key file was meant to turn authentication on
            raise ValueError(f"api_key_file {key_file} holds no API key (only blank or '#' lines); "
                             "add keys, or drop --api-key-file / EMBEDDING_API_KEY_FILE to serve without keys")
    return list(dict.fromkeys(digests))  # drop duplicates, keep order


def _parse_hex_digest(text: str, key_file: str, number: int) -> bytes:
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError(f"{key_file}:{number}: '{_HASH_PREFIX}' must be followed by 64 hex digits "
                         "(the SHA-256 of a key, e.g. `printf %s KEY | sha256sum`)")
    return digest


class ApiKeyVerifier:
    """Matches a presented key against the configured digests in constant time (per number of keys)."""

    def __init__(self, digests: Sequence[bytes]) -> None:
        if not digests:
            raise ValueError("ApiKeyVerifier needs at least one key")
        self._digests = tuple(digests)

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, presented: str) -> str | None:
        """The caller's id ("key-" + digest prefix) when the key is known, else None."""
        digest = key_digest(presented)
        found = -1
        for index, known in enumerate(self._digests):
            # Every digest is compared, match or not: no early exit.
            matched = hmac.compare_digest(digest, known)
            found = index if matched else found
        return None if found < 0 else "key-" + self._digests[found].hex()[:12]


def _bearer_token(scope: Scope) -> tuple[str | None, ServiceError | None]:
    """The token of the Authorization header, or the 401 to answer."""
    raw = next((value for name, value in scope.get("headers", ()) if name == b"authorization"), None)
    if raw is None:
        return None, ServiceError(ErrorKind.AUTHENTICATION,
                                  "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                                  code="missing_api_key", headers={"WWW-Authenticate": _REALM})
    scheme, _, token = raw.decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None, ServiceError(ErrorKind.AUTHENTICATION,
                                  "malformed Authorization header: expected 'Bearer YOUR_KEY'",
                                  code="invalid_authorization_header",
                                  headers={"WWW-Authenticate": _REALM + ', error="invalid_request"'})
    return token, None


class ApiKeyMiddleware:
    """401 unless the request carries a configured key; exempt paths (health, metrics) pass freely."""

    def __init__(self, app: ASGIApp, verifier: ApiKeyVerifier, exempt_paths: Sequence[str],
                 failures: RateLimiter | None = None) -> None:
        self.app = app
        self.verifier = verifier
        self.exempt_paths = tuple(exempt_paths)
        self.failures = failures  # a RateLimiter of failed attempts per address, or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_exempt(scope["path"], self.exempt_paths):
            await self.app(scope, receive, send)
            return
        address = str((scope.get("client") or ("?",))[0])
        if self.failures is not None:
            # Checked before the key, so a blocked address learns nothing from its guesses (a right key
            # gets 429 too); only failures are charged, so a client with its key is never slowed.
            wait_s = self.failures.request_wait("fail-" + address)
            if wait_s > 0:
                retry_after = max(1, math.ceil(wait_s))
                await send_error(send, ServiceError(
                    ErrorKind.RATE_LIMITED, f"too many failed API-key attempts from this address; retry after "
                    f"{retry_after}s", code="too_many_auth_failures", retry_after_s=wait_s))
                return
        token, error = _bearer_token(scope)
        if error is None:
            assert token is not None
            client_id = self.verifier.identify(token)
            if client_id is None:
                error = ServiceError(ErrorKind.AUTHENTICATION, "invalid API key", code="invalid_api_key",
                                     headers={"WWW-Authenticate": _REALM + ', error="invalid_token"'})
        if error is not None:
            if self.failures is not None:
                self.failures.charge_request("fail-" + address)
            path = scope["path"] if len(scope["path"]) <= 200 else scope["path"][:200] + "..."
            log.info("refused %s %s from %s: %s", scope.get("method"), path, address, error.code)
            await send_error(send, error)
            return
        scope[CLIENT_ID_KEY] = client_id
        await self.app(scope, receive, send)
