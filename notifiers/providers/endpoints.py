"""Where a Web Push request may go: the endpoint in a ``webpush:`` token is chosen by its sender.

Why this exists: whoever can store a token on a relay picks the URL the proxy
POSTs to.  Without a guard that is a server-side request forgery: the proxy
would POST to its own metrics port, a cloud metadata service or a router on
the operator's network.  So, before any byte is sent:

* the host must match the optional allow-list (``--webpush-allowed-endpoints``,
  glob patterns on the host name as Sygnal's ``allowed_endpoints``, e.g.
  ``*.push.services.mozilla.com``);
* every address the name resolves to must be public: private, loopback,
  link-local, multicast, unspecified, reserved and shared (CGNAT) addresses are
  refused, IPv4-mapped IPv6 addresses by the IPv4 address they carry;
* the connection goes to an address that was checked.  :class:`GuardedResolver`
  is the connector's resolver: it resolves once, checks every address and hands
  the connector only checked ones, so a second, different DNS answer (DNS
  rebinding) is never consulted.  TLS still uses the name for SNI and
  certificate verification, and the ``Host`` header carries the name.

IP-literal hosts are not resolved (aiohttp skips the resolver for them), so
:meth:`EndpointPolicy.check_literal` checks them first.  Loopback is allowed
only by ``allow_loopback`` (``--webpush-allow-loopback``, for tests and local
development, never production).  The policy is sans-I/O; only the resolver
touches the network.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: host, port, family -> the addresses it resolves to (text); injectable for tests.
Resolve = Callable[[str, int, int], Awaitable[list[str]]]


class EndpointRefused(Exception):
    """The endpoint may not be contacted; ``reason`` is a short metric-label-safe code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def address_refusal(address: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why ``address`` is no destination for a push (a reason code), or None if it is public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return None if allow_loopback else "loopback"
    if address.is_multicast:
        return "multicast"
    if address.is_link_local:
        return "link_local"
    if address.is_unspecified or address.is_reserved or not address.is_global:
        return "private"
    return None


def parse_patterns(value: str) -> tuple[str, ...]:
    """Host patterns from an option: separated by commas or whitespace, lower-cased."""
    patterns = tuple(p.lower() for p in value.replace(",", " ").split())
    for pattern in patterns:
        if "/" in pattern or ":" in pattern:
            raise ValueError(f"expected host name patterns such as *.example.org, got {pattern!r}")
    return patterns


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """The allow-list and the loopback exception; empty ``allowed_hosts`` allows any host."""

    allowed_hosts: tuple[str, ...] = ()
    allow_loopback: bool = False

    def check_host(self, host: str) -> None:
        """Raise :class:`EndpointRefused` if ``host`` is not on the allow-list."""
        name = host.lower().rstrip(".")
        if self.allowed_hosts and not any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self.allowed_hosts
        ):
            raise EndpointRefused("not_allowed", f"endpoint host {name} is not allowed")

    def check_literal(self, host: str) -> bool:
        """For an IP-literal ``host``: raise if refused, return True.  False for a name."""
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        self.check_addresses(host, [address])
        return True

    def check_addresses(self, host: str, addresses: Iterable[IPAddress]) -> None:
        """Raise :class:`EndpointRefused` unless every one of ``addresses`` is allowed."""
        for address in addresses:
            reason = address_refusal(address, allow_loopback=self.allow_loopback)
            if reason:
                raise EndpointRefused(reason, f"endpoint host {host} has a {reason} address")


async def system_resolve(host: str, port: int, family: int) -> list[str]:
    """The addresses of ``host`` from the system resolver (getaddrinfo, TCP)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, family=family, type=socket.SOCK_STREAM
    )
    return [str(info[4][0]) for info in infos]


class GuardedResolver(AbstractResolver):
    """The aiohttp resolver that returns only addresses the policy allows, or raises.

    All or nothing: one refused address refuses the name, so an answer that
    mixes a public and a private address cannot be used to reach the private one.
    """

    def __init__(self, policy: EndpointPolicy, resolve: Resolve = system_resolve) -> None:
        self.policy = policy
        self._resolve = resolve

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[ResolveResult]:
        try:
            texts = await self._resolve(host, port, family)
        except OSError as exc:
            raise EndpointRefused("dns", f"endpoint host {host} does not resolve") from exc
        addresses = []
        for text in texts:
            try:
                addresses.append(ipaddress.ip_address(text))
            except ValueError:
                raise EndpointRefused("dns", f"endpoint host {host}: bad address") from None
        if not addresses:
            raise EndpointRefused("dns", f"endpoint host {host} does not resolve")
        self.policy.check_addresses(host, addresses)
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None
