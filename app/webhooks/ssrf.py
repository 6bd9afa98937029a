"""The SSRF guard: which webhook URLs Parley may POST to, checked at submit and at delivery.

A URL passes when it is http(s) and its host, whether an address literal (in any of the
encodings a resolver accepts: `2130706433`, `0x7f.1`, `127.1`, `[::ffff:127.0.0.1]`) or a name
(every address it resolves to), is a public unicast address, or lies in the operator's
allow-list (`WEBHOOK_ALLOWED_NETWORKS`). The checked addresses are returned so that the
caller connects to one of them, never to a second answer of the resolver (DNS rebinding).

Two lookups: `resolve_host` (the C library's, on a thread: the I/O worker's) and
`hosts_file_addresses` then `resolve_dns` (the API's, at submit): DNS through c-ares
(aiodns), whose queries run on the event loop and one c-ares thread for all of them, so
a lookup abandoned at its timeout holds no thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import os
import re
import socket
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiodns
import httpx

from app.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Names of cloud metadata services that need not resolve to a link-local address everywhere.
_BLOCKED_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
_METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("169.254.170.2"),
        ipaddress.ip_address("fd00:ec2::254"),
    }
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Every dotted part a number in the C library's notations (decimal, 0x hex, 0 octal): such a
# host is an IPv4 literal to any resolver, however short or odd its form.
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$")
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")

_resolver_pool = concurrent.futures.ThreadPoolExecutor(
    max_workers=8, thread_name_prefix="parley-resolve"
)


class UnsafeWebhookUrl(ValueError):
    """The URL may not be used: the message says why, fit to show to the client."""


@dataclass(frozen=True)
class CheckedTarget:
    url: httpx.URL
    host: str
    port: int
    addresses: tuple[IPAddress, ...]
    # The host is an address literal, not a name (no SNI for it).
    is_literal: bool


def resolve_host(host: str, port: int, timeout: float) -> list[IPAddress]:
    """Every address `host` resolves to (one DNS lookup). Tests replace this function."""
    future = _resolver_pool.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        answers = future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise UnsafeWebhookUrl(f"the host {host!r} could not be resolved in time") from None
    except (OSError, UnicodeError):
        raise UnsafeWebhookUrl(f"the host {host!r} does not resolve") from None
    addresses: list[IPAddress] = []
    for _, _, _, _, sockaddr in answers:
        address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


# The hosts file, read as the C library's "files" source reads it; None: DNS servers of
# /etc/resolv.conf. Tests point these elsewhere.
HOSTS_FILE = Path("/etc/hosts")
DNS_SERVERS: list[str] | None = None
_hosts_cache: tuple[tuple[float, int], dict[str, list[IPAddress]]] | None = None
_resolvers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiodns.DNSResolver] = (
    weakref.WeakKeyDictionary()
)


def hosts_file_addresses(name: str) -> list[IPAddress] | None:
    """The addresses the hosts file gives `name` (lower case, no final dot), in file order;
    None when it does not name it (or there is no hosts file)."""
    global _hosts_cache
    try:
        stat = os.stat(HOSTS_FILE)
    except OSError:
        return None
    stamp = (stat.st_mtime, stat.st_size)
    if _hosts_cache is None or _hosts_cache[0] != stamp:
        table: dict[str, list[IPAddress]] = {}
        for line in HOSTS_FILE.read_text(errors="replace").splitlines():
            fields = line.partition("#")[0].split()
            if len(fields) < 2:
                continue
            try:
                address = ipaddress.ip_address(fields[0].partition("%")[0])
            except ValueError:
                continue
            for alias in fields[1:]:
                known = table.setdefault(alias.lower().rstrip("."), [])
                if address not in known:
                    known.append(address)
        _hosts_cache = (stamp, table)
    return _hosts_cache[1].get(name)


def _dns_resolver(timeout: float) -> aiodns.DNSResolver:
    """The running loop's c-ares channel (DNS only: the hosts file is read before it)."""
    loop = asyncio.get_running_loop()
    resolver = _resolvers.get(loop)
    if resolver is None:
        resolver = aiodns.DNSResolver(
            nameservers=DNS_SERVERS, loop=loop, timeout=timeout, tries=1, lookups="b"
        )
        _resolvers[loop] = resolver
    return resolver


async def close_dns() -> None:
    """Close the running loop's DNS channel, abandoning its queries: for the end of a loop
    (an answer due after it would find the loop closed)."""
    resolver = _resolvers.pop(asyncio.get_running_loop(), None)
    if resolver is not None:
        await resolver.close()


async def resolve_dns(host: str, port: int, seconds: float) -> list[IPAddress]:
    """Every address DNS gives `host`, within `seconds` (UnsafeWebhookUrl past them: the
    query is abandoned and no thread waits on it). The hosts file is the caller's to read
    first (hosts_file_addresses). Tests replace this function."""
    try:
        async with asyncio.timeout(seconds):
            answer = await _dns_resolver(seconds).getaddrinfo(
                host, port=port, type=socket.SOCK_STREAM
            )
    except TimeoutError:
        raise UnsafeWebhookUrl(
            f"the host {host!r} could not be resolved within {seconds:g}s"
        ) from None
    except (aiodns.error.DNSError, UnicodeError):
        raise UnsafeWebhookUrl(f"the host {host!r} does not resolve") from None
    addresses: list[IPAddress] = []
    for node in answer.nodes:
        raw = node.addr[0]
        text = raw.decode("ascii") if isinstance(raw, bytes) else str(raw)
        address = ipaddress.ip_address(text.partition("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (6to4, NAT64, IPv4-compatible), if any."""
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """Why `address` may not be reached, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A mapped address is the IPv4 one, on the wire and for the allow-list.
        return refusal(address.ipv4_mapped, allowed)
    # Cloud metadata first: no allow-list opens it (allowing 169.254.0.0/16 or ::/0 must not
    # open 169.254.169.254 or fd00:ec2::254 with it).
    if address in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if any(address.version == net.version and address in net for net in allowed):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        carried = refusal(embedded) if embedded is not None else None
        if carried is not None:
            return f"an IPv6 form of {carried}"
    checks: list[tuple[bool, str]] = [
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.version == 4 and address in _CGNAT, "a carrier-grade NAT (CGNAT) address"),
        (
            address.version == 6 and address in ipaddress.ip_network("fc00::/7"),
            "a unique-local address",
        ),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "a private address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
        (not address.is_global, "not a public address"),
    ]
    return next((reason for refused, reason in checks if refused), None)


def literal_address(host: str) -> IPAddress | None:
    """The address `host` spells, in any notation a resolver would accept, else None."""
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise UnsafeWebhookUrl(f"the host {host!r} is not a valid address") from None
    return None


def parse_webhook_url(url: str) -> httpx.URL:
    """The URL, if it is an absolute http(s) URL with a host; else UnsafeWebhookUrl."""
    try:
        parsed = httpx.URL(url)
        # httpx decodes an IDNA host only when it is read: a bad one fails here, not later.
        host = parsed.host
    except (httpx.InvalidURL, ValueError, TypeError):
        raise UnsafeWebhookUrl("not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise UnsafeWebhookUrl("only http and https URLs are allowed")
    if not host:
        raise UnsafeWebhookUrl("the URL has no host")
    # httpx accepts any digits as a port; a socket refuses what TCP cannot carry.
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise UnsafeWebhookUrl(f"the port {parsed.port} is not a TCP port (1 to 65535)")
    return parsed


def loggable_url(url: str) -> str:
    """The URL as a log line may show it: no credentials, no query, no fragment, which is
    where receivers put their tokens."""
    try:
        parsed = httpx.URL(url)
        return str(parsed.copy_with(username=None, password=None, query=None, fragment=None))
    except Exception:
        return "<not a valid URL>"


@dataclass(frozen=True)
class ParsedTarget:
    """A URL that passed every check that needs no lookup."""

    url: httpx.URL
    host: str
    port: int
    # The address the host spells, or None for a name (to be resolved).
    literal: IPAddress | None

    @property
    def name(self) -> str:
        return self.host.rstrip(".")


def parse_target(url: str) -> ParsedTarget:
    """Parse `url` and refuse what is refused before any lookup: scheme, port, a host that is
    neither an address nor a host name, a cloud metadata name. UnsafeWebhookUrl if so."""
    parsed = parse_webhook_url(url)
    host = parsed.host.lower()
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    name = host.rstrip(".")
    literal = literal_address(name)
    if literal is None:
        if not _HOST_NAME.match(name):
            raise UnsafeWebhookUrl(f"the host {host!r} is not a valid host name")
        if name in _BLOCKED_NAMES:
            raise UnsafeWebhookUrl(f"the host {host!r} is a cloud metadata service")
    return ParsedTarget(url=parsed, host=host, port=port, literal=literal)


def check_addresses(
    target: ParsedTarget, addresses: Sequence[IPAddress], allowed: Sequence[IPNetwork]
) -> CheckedTarget:
    """The target with its addresses (the literal's, or the name's answer), if every one may
    be reached; else UnsafeWebhookUrl."""
    if not addresses:
        raise UnsafeWebhookUrl(f"the host {target.host!r} does not resolve")
    for address in addresses:
        reason = refusal(address, allowed)
        if reason is not None:
            if target.literal is not None:
                raise UnsafeWebhookUrl(f"the host {str(target.literal)!r} is {reason}")
            raise UnsafeWebhookUrl(f"the host {target.host!r} resolves to {reason}")
    return CheckedTarget(
        url=target.url,
        host=target.host,
        port=target.port,
        addresses=tuple(addresses),
        is_literal=target.literal is not None,
    )


def check_url(url: str, *, allowed: Sequence[IPNetwork], resolve_timeout: float) -> CheckedTarget:
    """Parse, resolve once and check `url`; every address must pass. UnsafeWebhookUrl if not."""
    target = parse_target(url)
    addresses = (
        [target.literal]
        if target.literal is not None
        else resolve_host(target.name, target.port, resolve_timeout)
    )
    return check_addresses(target, addresses, allowed)
