"""What aiohttp's HTTP server may log about a request: never the bytes the client sent.

Why: aiohttp logs a misframed request at ERROR with the parser's exception,
whose text quotes the offending bytes; on a keep-alive ``/notify`` connection
with a short or missing ``Content-Length`` those bytes are a device token
(``Invalid method encountered: b'fcm-chat.delta:...'``).  Its access log quotes
the request line, ``Referer`` and ``User-Agent``, all chosen by the client.
:class:`RequestErrorLog` stands in for aiohttp's ``aiohttp.server`` logger and
:class:`SafeAccessLogger` for its access logger; :func:`start_listener
<notifiers.app.start_listener>` installs both.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import BaseRequest, StreamResponse

log = logging.getLogger("notifiers.http")

#: Methods and paths the access log may name; anything else is the client's text.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def _exception_of(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        return exc_info[1]
    return sys.exc_info()[1] if exc_info else None


class RequestErrorLog(logging.LoggerAdapter):
    """aiohttp's request-error logging, without the request's bytes.

    A request the parser refused is one DEBUG line naming the kind of error
    (internet scanners send such things all day); a client that went away is
    one DEBUG line; aiohttp's own debug lines lose their exception.  Only a
    real fault in a handler stays an ERROR with its traceback.
    """

    def __init__(self) -> None:
        super().__init__(log, {})

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = _exception_of(kwargs.pop("exc_info", None))
        if isinstance(exc, HttpProcessingError):
            self.logger.debug(
                "refused a malformed request (%s, status %s)", type(exc).__name__, exc.code
            )
        elif isinstance(exc, ConnectionError):
            self.logger.debug("client went away (%s)", type(exc).__name__)
        elif level >= logging.WARNING and exc is not None:
            self.logger.log(level, msg, *args, exc_info=exc)
        else:
            self.logger.log(level, msg, *args)


class SafeAccessLogger(AbstractAccessLogger):
    """One INFO line per response: peer, method, route, status, size, time.

    The path is named only when it is one of the app's routes, so a token sent
    as a path or header is never written.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        method = request.method if request.method in _METHODS else "-"
        self.logger.info(
            "%s %s %s %d %d %.3fs",
            request.remote,
            method,
            _route_path(request),
            response.status,
            response.body_length,
            time,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _route_path(request: BaseRequest) -> str:
    """The matched route's path, or ``-`` (no route matched, or a refused request)."""
    try:
        match_info = getattr(request, "match_info", None)
    except AssertionError:  # a request refused before routing has none
        return "-"
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "-"
