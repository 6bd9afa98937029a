"""Opaque, time-ordered ids: `<prefix>_<26 base32 chars>` (48-bit ms clock, 80 random bits).

Time-ordered ids keep btree inserts local and give lists a natural creation order.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


def plausible_id(value: str) -> bool:
    """False for strings no id can be: they are answered as unknown ids (404), unqueried."""
    return 0 < len(value) <= 64 and value.isascii() and value.isprintable()
