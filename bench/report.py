"""How the benchmarks print: one `say`, and one way to compute a percentile, so that every
benchmark's figures are comparable."""

from __future__ import annotations


def say(text: str) -> None:
    print(text, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile `q` (0 to 1) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
