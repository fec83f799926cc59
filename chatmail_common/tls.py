"""The TLS trust setting of outgoing HTTPS (push services, the relay's proxy URL)."""

from __future__ import annotations

import ssl

#: An :class:`ssl.SSLContext` (used as it is), a CA bundle path, ``True`` (the
#: default trust store, certifi's as httpx uses) or ``False`` (no verification; tests only).
Verify = ssl.SSLContext | str | bool


def make_ssl_context(verify: Verify) -> ssl.SSLContext:
    """A client SSLContext honouring ``verify`` (fresh unless one was given)."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    import certifi  # httpx's own default trust store

    return ssl.create_default_context(cafile=certifi.where())
