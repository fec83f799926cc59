"""``HOST:PORT`` option values (``--metrics``, ``[notifiers] metrics``), parsed one way."""

from __future__ import annotations


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` -> (host, port); ValueError naming the value if malformed.

    Port 0 is refused: a listener on a port chosen by the kernel cannot be scraped.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)
