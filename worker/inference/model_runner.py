"""The model's forward passes: prefill of a group of prompts, prefill of what follows a cached
prefix, and one decoding step of the whole batch. Each returns the rows' last logits (float32,
[rows, vocab]) for the sampler; keys and values stay in the `BatchCache`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from worker.inference.kv_cache import BatchCache
from worker.inference.prefix_cache import PrefixHit


class ModelRunner:
    def __init__(self, model: Any, *, device: torch.device, pad_token_id: int) -> None:
        self._model = model
        self.device = device
        self._pad = pad_token_id

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[BatchCache, torch.Tensor]:
        """Run whole prompts, left padded to the longest of them."""
        ids, cache = BatchCache.for_prompts(prompts, pad_token_id=self._pad, device=self.device)
        return cache, self._forward(ids, cache)

    @torch.inference_mode()
    def prefill_after(
        self, prompt: Sequence[int], hit: PrefixHit
    ) -> tuple[BatchCache, torch.Tensor]:
        """Run only the tokens of ``prompt`` that follow its cached prefix."""
        cache = BatchCache.after_prefix(hit.layers, len(prompt), device=self.device)
        ids = torch.tensor([list(prompt[hit.shared :])], device=self.device)
        return cache, self._forward(ids, cache)

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], cache: BatchCache) -> torch.Tensor:
        """Run each row's newest token (``tokens``, in row order) through the model."""
        cache.extend()
        ids = torch.tensor(list(tokens), device=self.device)[:, None]
        return self._forward(ids, cache)

    def _forward(self, ids: torch.Tensor, cache: BatchCache) -> torch.Tensor:
        out = self._model(input_ids=ids, use_cache=True, **cache.forward_args(ids.shape[1]))
        cache.update(out.past_key_values)
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits
