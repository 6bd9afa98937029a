"""One HTTP attempt of a webhook: to an address the SSRF guard checked, bounded in time and in
what is read back.

The URL is checked (and its name resolved) once; the connection is made to a checked address,
with the original Host header and, for https, SNI and certificate checks against the original
name. A hard deadline covers the whole exchange (a receiver that trickles its answer cannot
hold a worker past it), redirects are never followed, and at most MAX_RESPONSE_BYTES of the
answer are read (raw: a compressed body is not inflated).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

from app.config import IPNetwork
from app.webhooks import ssrf

log = logging.getLogger("parley.webhooks")

MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "Parley-Webhooks/1.0"


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    error: str | None
    duration_ms: int
    # Answer bytes read (at most MAX_RESPONSE_BYTES plus one network read).
    bytes_read: int = 0

    @property
    def delivered(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300


async def _exchange(
    target: ssrf.CheckedTarget, body: bytes, headers: dict[str, str], seconds: float
) -> tuple[int, int]:
    """POST to the first checked address that accepts a connection: (status, bytes read)."""
    request_headers = {
        **headers,
        "Host": target.url.netloc.decode("ascii"),
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    https_name = target.url.scheme == "https" and not target.is_literal
    extensions = {"sni_hostname": target.host.rstrip(".")} if https_name else {}
    async with (
        asyncio.timeout(seconds),
        httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=seconds) as client,
    ):
        refused: httpx.ConnectError | None = None
        for address in target.addresses:
            request = client.build_request(
                "POST",
                target.url.copy_with(host=str(address)),
                content=body,
                headers=request_headers,
                extensions=extensions,
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                refused = exc
                continue
            read = 0
            try:
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= MAX_RESPONSE_BYTES:
                        break
            finally:
                await response.aclose()
            return response.status_code, read
        assert refused is not None
        raise refused


def describe(exc: BaseException) -> str:
    """`Type: message`, fit for an attempt's record; a group of exceptions (anyio's task
    groups raise them) is named by its leaves."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(leaf) for leaf in exc.exceptions)[:500]
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    allowed: list[IPNetwork],
    timeout: float,
    resolve_timeout: float,
) -> AttemptResult:
    """One attempt; never raises for anything the receiver, the network or the resolver
    does."""
    started = time.monotonic()

    def elapsed_ms() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        target = ssrf.check_url(url, allowed=allowed, resolve_timeout=resolve_timeout)
    except ssrf.UnsafeWebhookUrl as exc:
        # Checked again at each attempt: a name may now resolve elsewhere (DNS rebinding).
        return AttemptResult(None, f"refused, no connection made: {exc}", elapsed_ms())
    except Exception as exc:
        log.exception("webhook URL check failed: %s", ssrf.loggable_url(url))
        return AttemptResult(
            None, f"the URL could not be checked, no connection made: {describe(exc)}", elapsed_ms()
        )
    try:
        status, read = asyncio.run(_exchange(target, body, headers, timeout))
    except (TimeoutError, httpx.TimeoutException):
        return AttemptResult(None, f"timeout: no complete answer within {timeout:g}s", elapsed_ms())
    except httpx.HTTPError as exc:
        return AttemptResult(None, describe(exc), elapsed_ms())
    except OSError as exc:
        return AttemptResult(None, describe(exc), elapsed_ms())
    except Exception as exc:
        # Anything else the network stack raises (an ExceptionGroup from a task group, an
        # OverflowError): the attempt failed, and says how.
        log.exception("webhook POST to %s failed unexpectedly", ssrf.loggable_url(url))
        return AttemptResult(None, describe(exc), elapsed_ms())
    error = f"redirect not followed (HTTP {status})" if 300 <= status < 400 else None
    return AttemptResult(status, error, elapsed_ms(), read)
