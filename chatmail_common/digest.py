"""The short token digest of every log line and metric: tokens are never logged in plaintext."""

from __future__ import annotations

import hashlib

DIGEST_HEX_DIGITS = 12


def token_digest(token: str) -> str:
    """12 hex digits of SHA-256 over the token's UTF-8 (stable across both programs).

    ``surrogatepass`` so that no string, however broken, makes logging raise.
    """
    data = token.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:DIGEST_HEX_DIGITS]
