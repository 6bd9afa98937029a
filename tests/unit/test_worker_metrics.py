"""The worker's metrics of its prefix cache read the cache's own counts."""

from __future__ import annotations

from worker.inference.prefix_cache import PrefixCache
from worker.turn_worker.metrics import PrefixCacheCollector


def test_the_prefix_cache_counts_are_published() -> None:
    cache = PrefixCache(max_bytes=2**20)
    cache.hits, cache.misses, cache.reused_tokens = 9, 1, 420
    samples = {
        sample.name: sample.value
        for family in PrefixCacheCollector(cache).collect()
        for sample in family.samples
    }
    assert samples == {
        "parley_worker_prefix_cache_hits_total": 9,
        "parley_worker_prefix_cache_misses_total": 1,
        "parley_worker_prefix_cache_reused_tokens_total": 420,
    }
