"""The webhook_url check at submit (vet_submitted_url): the SSRF guard's refusals as 422 on
webhook_url, the hosts file read before DNS, DNS through c-ares on the event loop bounded in
time, and the bounds on lookups in flight (per process, and a tenant's share of them).

DNS is a server of these tests on loopback (one that answers, one that never does): no query
leaves the machine."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from app.config import Settings
from app.errors import ProblemError
from app.webhooks import events, ssrf

LOOPBACK = "127.0.0.0/8"
T = TypeVar("T")


def settings(**values: Any) -> Settings:
    values.setdefault("webhook_allowed_networks", "")
    return Settings(**values)


class DnsServer:
    """A UDP DNS server on loopback: A records from `answers`, NXDOMAIN for other names,
    no answer at all when `silent` (a resolver that hangs)."""

    def __init__(self, answers: dict[str, str], *, silent: bool = False) -> None:
        self.answers = answers
        self.silent = silent
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                packet, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            name, qtype, end = self._question(packet)
            self.queries.append(name)
            if not self.silent:
                self.sock.sendto(self._reply(packet, name, qtype, end), peer)

    @staticmethod
    def _question(packet: bytes) -> tuple[str, int, int]:
        labels, at = [], 12
        while packet[at]:
            labels.append(packet[at + 1 : at + 1 + packet[at]].decode("ascii"))
            at += 1 + packet[at]
        qtype = struct.unpack("!H", packet[at + 1 : at + 3])[0]
        return ".".join(labels).lower(), qtype, at + 5

    def _reply(self, packet: bytes, name: str, qtype: int, end: int) -> bytes:
        known = name in self.answers
        records = b""
        if known and qtype == 1:  # A; no AAAA record for any name
            address = socket.inet_aton(self.answers[name])
            records = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + address
        flags = 0x8180 if known else 0x8183  # a response, recursion; NOERROR or NXDOMAIN
        header = packet[:2] + struct.pack("!HHHHH", flags, 1, 1 if records else 0, 0, 0)
        return header + packet[12:end] + records

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def hosts_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "hosts"
    path.write_text(
        "# a comment\n127.0.0.1 localhost\n127.0.1.1 box.local box # trailing\n"
        "::1 ip6-localhost\n10.9.8.7 intranet.example\n"
    )
    monkeypatch.setattr(ssrf, "HOSTS_FILE", path)
    return path


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch, hosts_file: Path) -> Iterator[DnsServer]:
    server = DnsServer({"public.example": "93.184.215.14", "private.example": "10.1.2.3"})
    monkeypatch.setattr(ssrf, "DNS_SERVERS", [server.address])
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def silent_dns(monkeypatch: pytest.MonkeyPatch, hosts_file: Path) -> Iterator[DnsServer]:
    server = DnsServer({}, silent=True)
    monkeypatch.setattr(ssrf, "DNS_SERVERS", [server.address])
    try:
        yield server
    finally:
        server.close()


def os_threads() -> int:
    """This process's threads, Python's and native ones (c-ares runs one of its own)."""
    return len(os.listdir("/proc/self/task"))


def run(check: Coroutine[Any, Any, T]) -> T:
    """`check` on a loop of its own, whose DNS channel is closed before the loop is."""

    async def then_close() -> T:
        try:
            return await check
        finally:
            await ssrf.close_dns()

    return asyncio.run(then_close())


def vet(url: str, config: Settings | None = None, *, tenant: str = "acme") -> None:
    run(events.vet_submitted_url(url, config or settings(), tenant_id=tenant))


def refused(url: str, config: Settings | None = None) -> ProblemError:
    with pytest.raises(ProblemError) as caught:
        vet(url, config)
    return caught.value


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/", "'127.0.0.1' is a loopback address"),
        ("http://0x7f.1/", "'127.0.0.1' is a loopback address"),
        ("http://169.254.169.254/latest/", "'169.254.169.254' is a cloud metadata address"),
        ("http://[fd00:ec2::254]/", "'fd00:ec2::254' is a cloud metadata address"),
        ("http://metadata.google.internal/", "is a cloud metadata service"),
        ("http://public.example:99999/", "the port 99999 is not a TCP port (1 to 65535)"),
        ("https://public.example:0/", "the port 0 is not a TCP port (1 to 65535)"),
        ("ftp://public.example/", "only http and https URLs are allowed"),
        ("http://exa mple.com/", "is not a valid host name"),
        ("http://10.0.0.1/", "'10.0.0.1' is a private address"),
    ],
)
def test_refusals_that_need_no_lookup_are_422_on_webhook_url(
    url: str, reason: str, dns: DnsServer
) -> None:
    problem = refused(url)
    assert problem.status == 422
    assert problem.detail.startswith("webhook_url is not allowed: ") and reason in problem.detail
    [error] = problem.errors or []
    assert error["loc"] == ["body", "webhook_url"] and reason in error["msg"]
    assert dns.queries == []


def test_names_are_resolved_by_dns_and_every_answer_is_checked(dns: DnsServer) -> None:
    vet("https://public.example/hooks")
    problem = refused("http://private.example/")
    assert problem.status == 422
    assert "'private.example' resolves to a private address" in problem.detail
    problem = refused("http://nowhere.example/")
    assert "'nowhere.example' does not resolve" in problem.detail
    assert {"public.example", "private.example", "nowhere.example"} <= set(dns.queries)
    # The allow-list opens the private answer, not the metadata address.
    vet("http://private.example/", settings(webhook_allowed_networks="10.0.0.0/8"))


def test_hosts_file_names_are_read_there_and_never_sent_to_dns(dns: DnsServer) -> None:
    loopback = settings(webhook_allowed_networks=LOOPBACK)
    # localhost is what the hosts file says (127.0.0.1), not also ::1 as c-ares would add.
    vet("http://localhost:8080/hook", loopback)
    vet("http://LOCALHOST./hook", loopback)
    vet("http://box:9/", loopback)
    assert "a loopback address" in refused("http://localhost/").detail
    assert (
        "'intranet.example' resolves to a private address"
        in refused("http://intranet.example/", loopback).detail
    )
    assert "a loopback address" in refused("http://ip6-localhost/", loopback).detail
    assert dns.queries == []


def test_the_hosts_file_is_read_again_when_it_changes(hosts_file: Path, dns: DnsServer) -> None:
    assert ssrf.hosts_file_addresses("localhost") == [ipaddress.ip_address("127.0.0.1")]
    hosts_file.write_text("127.0.0.1 localhost\n::1 localhost\n# and one more line\n")
    assert ssrf.hosts_file_addresses("localhost") == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert ssrf.hosts_file_addresses("box") is None


def test_a_silent_resolver_is_a_422_at_the_timeout_and_holds_no_thread(
    silent_dns: DnsServer,
) -> None:
    config = settings(webhook_resolve_timeout_seconds=0.3, webhook_resolve_concurrency=64)

    async def many() -> list[BaseException | None]:
        async def one(i: int) -> None:
            await events.vet_submitted_url(
                f"http://slow{i}.example/", config, tenant_id=f"tenant-{i}"
            )

        return await asyncio.gather(*(one(i) for i in range(12)), return_exceptions=True)

    async def one_then_many() -> tuple[int, list[BaseException | None], int]:
        with pytest.raises(ProblemError):
            await events.vet_submitted_url("http://first.example/", config, tenant_id="t")
        before = os_threads()
        outcomes = await many()
        return before, outcomes, os_threads()

    started = time.monotonic()
    before, outcomes, after = run(one_then_many())
    elapsed = time.monotonic() - started
    assert all(isinstance(o, ProblemError) and o.status == 422 for o in outcomes), outcomes
    detail = str(outcomes[0])
    assert "webhook_url is not allowed" in detail and "within 0.3s" in detail
    # Two rounds of 0.3 s, not one lookup after another, and no thread per lookup: the
    # lookups wait on c-ares' thread, not on a thread each.
    assert elapsed < 2.0
    assert after <= before
    assert events.lookup_slots.in_flight() == 0
    assert len(silent_dns.queries) >= 12


class Gate:
    """A resolver that answers only when released."""

    def __init__(self) -> None:
        self.waiting = 0
        self.release = asyncio.Event()

    async def resolve(self, host: str, port: int, seconds: float) -> list[ssrf.IPAddress]:
        self.waiting += 1
        await self.release.wait()
        return [ipaddress.ip_address("93.184.215.14")]


def test_lookups_in_flight_are_bounded_per_process_and_per_tenant(
    monkeypatch: pytest.MonkeyPatch, hosts_file: Path
) -> None:
    config = settings(webhook_resolve_concurrency=8, webhook_resolve_timeout_seconds=2.5)
    gate = Gate()
    monkeypatch.setattr(ssrf, "resolve_dns", gate.resolve)

    async def scenario() -> None:
        def submit(tenant: str, url: str = "http://slow.example/") -> asyncio.Task[None]:
            return asyncio.create_task(events.vet_submitted_url(url, config, tenant_id=tenant))

        async def answer(tenant: str, url: str = "http://slow.example/") -> ProblemError:
            started = time.monotonic()
            with pytest.raises(ProblemError) as caught:
                await events.vet_submitted_url(url, config, tenant_id=tenant)
            assert time.monotonic() - started < 0.1  # at once, not after a wait
            return caught.value

        # A tenant takes its share, a quarter of the 8: its third lookup is its own 429.
        held = [submit("greedy"), submit("greedy")]
        await asyncio.sleep(0.05)
        problem = await answer("greedy")
        assert problem.status == 429 and problem.headers == {"Retry-After": "3"}
        # Other tenants still get theirs, up to the process's 8, then 503 for anyone.
        held += [submit(t) for t in ("b", "b", "c", "c", "d", "d")]
        await asyncio.sleep(0.05)
        assert events.lookup_slots.in_flight() == 8 and gate.waiting == 8
        problem = await answer("e")
        assert problem.status == 503 and problem.headers == {"Retry-After": "3"}
        # What needs no lookup takes no slot.
        await events.vet_submitted_url("http://93.184.215.14/", config, tenant_id="e")
        await events.vet_submitted_url(
            "http://localhost/",
            config.model_copy(
                update={"webhook_allowed_networks": [ipaddress.ip_network(LOOPBACK)]}
            ),
            tenant_id="e",
        )
        gate.release.set()
        await asyncio.gather(*held)
        assert events.lookup_slots.in_flight() == 0
        await events.vet_submitted_url("http://slow.example/", config, tenant_id="greedy")

    run(scenario())


def test_a_failed_lookup_gives_its_slot_back(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(host: str, port: int, seconds: float) -> list[ssrf.IPAddress]:
        raise ssrf.UnsafeWebhookUrl(f"the host {host!r} does not resolve")

    monkeypatch.setattr(ssrf, "resolve_dns", broken)
    config = settings(webhook_resolve_concurrency=1)
    for _ in range(3):
        assert refused("http://gone.example/", config).status == 422
    assert events.lookup_slots.in_flight() == 0
