"""The SSRF guard (reliability F8), with the resolver stubbed: no DNS query, no traffic."""

from __future__ import annotations

import ipaddress

import pytest

from app.webhooks import ssrf

LOOPBACK_ONLY = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.fixture(autouse=True)
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """A fake DNS: names map to the addresses given; any other name does not resolve."""
    answers: dict[str, list[str]] = {
        "example.com": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
        "internal.example": ["10.1.2.3"],
        "mixed.example": ["93.184.215.14", "192.168.1.10"],
        "metadata-alias.example": ["169.254.169.254"],
        "v6-loopback.example": ["::1"],
        "mapped.example": ["::ffff:10.0.0.1"],
        "localhost": ["127.0.0.1"],
    }

    def fake(host: str, port: int, timeout: float) -> list[ssrf.IPAddress]:
        if host not in answers:
            raise ssrf.UnsafeWebhookUrl(f"the host {host!r} does not resolve")
        return [ipaddress.ip_address(a) for a in answers[host]]

    monkeypatch.setattr(ssrf, "resolve_host", fake)
    return answers


def check(url: str, allowed: list[ssrf.IPNetwork] | None = None) -> ssrf.CheckedTarget:
    return ssrf.check_url(url, allowed=allowed or [], resolve_timeout=1)


REFUSED = [
    # loopback, in every spelling a resolver accepts
    "http://127.0.0.1/",
    "http://127.0.0.1./hook",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0x7f.1/",
    "http://017700000001/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]:8080/",
    "http://[0:0:0:0:0:ffff:127.0.0.1]/",
    "http://[::127.0.0.1]/",
    # private, link-local, unique-local, CGNAT, multicast, unspecified, reserved
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.0.1/",
    "http://169.254.10.10/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://0.0.0.0/",
    "http://0/",
    "http://[::]/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    # private addresses carried inside IPv6 forms (NAT64, 6to4)
    "http://[64:ff9b::a00:1]/",
    "http://[2002:a00:1::1]/",
    # cloud metadata, by address and by name
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.google.internal./",
    # names that resolve to such addresses (one bad answer is enough)
    "http://internal.example/",
    "http://mixed.example/",
    "http://metadata-alias.example/",
    "http://v6-loopback.example/",
    "http://mapped.example/",
    "https://localhost:8443/",
    # not http(s), no host, not a host, does not resolve
    "ftp://example.com/",
    "file:///etc/passwd",
    "gopher://example.com/",
    "http:///path-only",
    "not a url",
    "http://exa mple.com/",
    "http://999.1.1.1/",
    "http://does-not-resolve.example/",
]


@pytest.mark.parametrize("url", REFUSED)
def test_refused(url: str) -> None:
    with pytest.raises(ssrf.UnsafeWebhookUrl):
        check(url)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://2130706433/", "loopback"),
        ("http://10.0.0.1/", "private"),
        ("http://169.254.169.254/", "metadata"),
        ("http://100.64.0.1/", "CGNAT"),
        ("http://[fd12::1]/", "unique-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://224.0.0.1/", "multicast"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://internal.example/", "resolves to a private address"),
    ],
)
def test_the_refusal_says_why(url: str, reason: str) -> None:
    with pytest.raises(ssrf.UnsafeWebhookUrl, match=reason):
        check(url)


def test_public_addresses_pass_and_every_answer_is_kept() -> None:
    target = check("https://example.com/hooks/parley?x=1")
    assert [str(a) for a in target.addresses] == [
        "93.184.215.14",
        "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
    ]
    assert (target.host, target.port, target.is_literal) == ("example.com", 443, False)
    assert check("http://8.8.8.8:8080/").addresses == (ipaddress.ip_address("8.8.8.8"),)
    assert check("http://[2606:4700::1111]/").is_literal


def test_the_allow_list_opens_only_its_networks() -> None:
    assert check("http://127.0.0.1:9000/", LOOPBACK_ONLY).port == 9000
    # Any spelling of an allowed address is that address.
    assert str(check("http://2130706433/", LOOPBACK_ONLY).addresses[0]) == "127.0.0.1"
    assert str(check("http://[::ffff:127.0.0.1]/", LOOPBACK_ONLY).addresses[0]) == "::ffff:7f00:1"
    assert check("http://localhost/", LOOPBACK_ONLY).addresses
    for url in ("http://10.0.0.1/", "http://169.254.169.254/", "http://[::1]/"):
        with pytest.raises(ssrf.UnsafeWebhookUrl):
            check(url, LOOPBACK_ONLY)
    # A carrier of an allowed address is not the address: NAT64 would leave the host.
    with pytest.raises(ssrf.UnsafeWebhookUrl):
        check("http://[64:ff9b::7f00:1]/", LOOPBACK_ONLY)


def test_names_are_resolved_once_per_check(resolver: dict[str, list[str]]) -> None:
    """DNS rebinding: each check asks once, and the answer it checked is the one returned."""
    resolver["rebind.example"] = ["93.184.215.14"]
    target = check("http://rebind.example/")
    resolver["rebind.example"] = ["10.0.0.1"]
    with pytest.raises(ssrf.UnsafeWebhookUrl):
        check("http://rebind.example/")
    assert [str(a) for a in target.addresses] == ["93.184.215.14"]
