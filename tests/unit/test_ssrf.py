"""The SSRF guard (reliability F8), with the resolver stubbed: no DNS query, no traffic."""

from __future__ import annotations

import ipaddress
import re

import pytest

from app.webhooks import ssrf

LOOPBACK_ONLY = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.fixture
def lookups() -> list[str]:
    """The names the fake DNS was asked, in order."""
    return []


@pytest.fixture(autouse=True)
def resolver(monkeypatch: pytest.MonkeyPatch, lookups: list[str]) -> dict[str, list[str]]:
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
        lookups.append(host)
        if host not in answers:
            raise ssrf.UnsafeWebhookUrl(f"the host {host!r} does not resolve")
        return [ipaddress.ip_address(a) for a in answers[host]]

    monkeypatch.setattr(ssrf, "resolve_host", fake)
    return answers


def check(url: str, allowed: list[ssrf.IPNetwork] | None = None) -> ssrf.CheckedTarget:
    return ssrf.check_url(url, allowed=allowed or [], resolve_timeout=1)


# Each URL with the end of its refusal: a literal "is" what it spells (the address shown as
# decoded), a name "resolves to" its answer. A literal refused as an unknown name would say
# "does not resolve" instead, and would have been looked up.
REFUSED = [
    # loopback, in every spelling a resolver accepts
    ("http://127.0.0.1/", "'127.0.0.1' is a loopback address"),
    ("http://127.0.0.1./hook", "'127.0.0.1' is a loopback address"),
    ("http://2130706433/", "'127.0.0.1' is a loopback address"),
    ("http://0x7f000001/", "'127.0.0.1' is a loopback address"),
    ("http://0x7f.1/", "'127.0.0.1' is a loopback address"),
    ("http://017700000001/", "'127.0.0.1' is a loopback address"),
    # httpx itself refuses dotted octal (test_legacy_ipv4_spellings covers the guard's parse)
    ("http://0177.0.0.1/", "not a valid URL"),
    ("http://127.1/", "'127.0.0.1' is a loopback address"),
    ("http://[::1]/", "'::1' is a loopback address"),
    ("http://[::ffff:127.0.0.1]/", "'::ffff:7f00:1' is a loopback address"),
    ("http://[::ffff:7f00:1]:8080/", "'::ffff:7f00:1' is a loopback address"),
    ("http://[0:0:0:0:0:ffff:127.0.0.1]/", "'::ffff:7f00:1' is a loopback address"),
    ("http://[::127.0.0.1]/", "'::7f00:1' is an IPv6 form of a loopback address"),
    # ports TCP cannot carry (a socket would raise OverflowError at delivery)
    ("http://public.example:99999/", "the port 99999 is not a TCP port (1 to 65535)"),
    ("https://public.example:0/", "the port 0 is not a TCP port (1 to 65535)"),
    # private, link-local, unique-local, CGNAT, multicast, unspecified, reserved
    ("http://10.0.0.1/", "'10.0.0.1' is a private address"),
    ("http://172.16.5.4/", "'172.16.5.4' is a private address"),
    ("http://192.168.0.1/", "'192.168.0.1' is a private address"),
    ("http://169.254.10.10/", "'169.254.10.10' is a link-local address"),
    ("http://[fe80::1]/", "'fe80::1' is a link-local address"),
    ("http://[fc00::1]/", "'fc00::1' is a unique-local address"),
    ("http://[fd12:3456::1]/", "'fd12:3456::1' is a unique-local address"),
    ("http://100.64.0.1/", "'100.64.0.1' is a carrier-grade NAT (CGNAT) address"),
    ("http://100.127.255.254/", "'100.127.255.254' is a carrier-grade NAT (CGNAT) address"),
    ("http://224.0.0.1/", "'224.0.0.1' is a multicast address"),
    ("http://[ff02::1]/", "'ff02::1' is a multicast address"),
    ("http://0.0.0.0/", "'0.0.0.0' is an unspecified address"),
    ("http://0/", "'0.0.0.0' is an unspecified address"),
    ("http://[::]/", "'::' is an unspecified address"),
    ("http://240.0.0.1/", "'240.0.0.1' is a reserved address"),
    ("http://255.255.255.255/", "'255.255.255.255' is a reserved address"),
    # private addresses carried inside IPv6 forms (NAT64, 6to4)
    ("http://[64:ff9b::a00:1]/", "'64:ff9b::a00:1' is an IPv6 form of a private address"),
    ("http://[2002:a00:1::1]/", "'2002:a00:1::1' is an IPv6 form of a private address"),
    # cloud metadata, by address and by name
    ("http://169.254.169.254/latest/meta-data/", "'169.254.169.254' is a cloud metadata address"),
    ("http://[fd00:ec2::254]/", "'fd00:ec2::254' is a cloud metadata address"),
    (
        "http://metadata.google.internal/computeMetadata/v1/",
        "'metadata.google.internal' is a cloud metadata service",
    ),
    (
        "http://METADATA.google.internal./",
        "'metadata.google.internal.' is a cloud metadata service",
    ),
    # names that resolve to such addresses (one bad answer is enough)
    ("http://internal.example/", "'internal.example' resolves to a private address"),
    ("http://mixed.example/", "'mixed.example' resolves to a private address"),
    (
        "http://metadata-alias.example/",
        "'metadata-alias.example' resolves to a cloud metadata address",
    ),
    ("http://v6-loopback.example/", "'v6-loopback.example' resolves to a loopback address"),
    ("http://mapped.example/", "'mapped.example' resolves to a private address"),
    ("https://localhost:8443/", "'localhost' resolves to a loopback address"),
    # not http(s), no host, not a host, does not resolve
    ("ftp://example.com/", "only http and https URLs are allowed"),
    ("file:///etc/passwd", "only http and https URLs are allowed"),
    ("gopher://example.com/", "only http and https URLs are allowed"),
    ("http:///path-only", "the URL has no host"),
    ("not a url", "only http and https URLs are allowed"),
    ("http://exa mple.com/", "'exa%20mple.com' is not a valid host name"),
    ("http://999.1.1.1/", "not a valid URL"),
    ("http://does-not-resolve.example/", "'does-not-resolve.example' does not resolve"),
]
# The names above that are looked up; no other URL reaches the resolver.
LOOKED_UP = {
    "internal.example",
    "mixed.example",
    "metadata-alias.example",
    "v6-loopback.example",
    "mapped.example",
    "localhost",
    "does-not-resolve.example",
}


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_refused(url: str, reason: str, lookups: list[str]) -> None:
    with pytest.raises(ssrf.UnsafeWebhookUrl, match=re.escape(reason) + "$"):
        check(url)
    assert lookups == [name for name in LOOKED_UP if f"'{name}'" in reason]


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "0x7f000001", "0x7f.1", "017700000001", "0177.0.0.1", "127.1"],
)
def test_legacy_ipv4_spellings(host: str) -> None:
    """Every notation the C library's resolver accepts is read as the address it spells."""
    assert ssrf.literal_address(host) == ipaddress.ip_address("127.0.0.1")


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


def test_no_allow_list_opens_cloud_metadata() -> None:
    """An operator who allows the link-local range, or everything, still cannot reach the
    metadata service: it is refused before the allow-list is read."""
    link_local = [ipaddress.ip_network("169.254.0.0/16")]
    everything = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    assert check("http://169.254.10.10/", link_local).port == 80  # the range itself opens
    for url in ("http://169.254.169.254/latest/", "http://[fd00:ec2::254]/"):
        for allowed in (link_local, everything):
            with pytest.raises(ssrf.UnsafeWebhookUrl, match="cloud metadata address"):
                check(url, allowed)


def test_a_logged_webhook_url_keeps_no_token() -> None:
    url = "https://user:pass@hooks.example.com:8443/in/a?token=s3cret&sig=x#frag"
    logged = ssrf.loggable_url(url)
    assert logged == "https://hooks.example.com:8443/in/a"
    assert ssrf.loggable_url("http://[::1") == "<not a valid URL>"
