"""The model's forward passes over the slot cache: prefill of prompts (or of what follows a
cached prefix, or one chunk of a long prompt) into given slots, and one decoding step of the
batch. Each returns the rows' last logits (float32, [rows, vocab]) for the sampler; keys and
values stay in the `SlotCache`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from worker.inference.kv_cache import SlotCache


class ModelRunner:
    def __init__(self, model: Any, *, pad_token_id: int, cache: SlotCache) -> None:
        self._model = model
        self._pad = pad_token_id
        self._cache = cache

    @torch.inference_mode()
    def prefill(
        self, first: int, prompts: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> torch.Tensor:
        """Run ``prompts`` (right padded to the longest) into slots ``first``.., slot r of
        which already holds ``starts[r]`` tokens of its prompt (a cached prefix, or 0)."""
        cache, device = self._cache, self._cache.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        # Only each row's last position needs logits; rows of several lengths name their own.
        # Projecting every position onto the vocabulary cost a group of 16 rows of 20-24 tokens
        # (the small model) 4% of its pass and 74 MB of logits.
        keep: int | torch.Tensor = 1
        if any(len(p) != width for p in prompts):
            keep = torch.tensor([[len(p) - 1] for p in prompts], device=device)
        out = self._model(
            input_ids=ids.to(device),
            use_cache=True,
            logits_to_keep=keep,
            **cache.prefill_args(first, list(starts), width),
        )
        for row, (prompt, start) in enumerate(zip(prompts, starts, strict=True)):
            cache.lengths[first + row] = start + len(prompt)
        last: torch.Tensor = out.logits[:, -1, :]
        return last.float()

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """Run each row's newest token (``tokens``, in slot order) through the model."""
        cache = self._cache
        rows = len(tokens)
        ids = torch.tensor(list(tokens), device=cache.device)[:, None]
        out = self._model(input_ids=ids, use_cache=True, **cache.decode_args(rows))
        for row in range(rows):
            cache.lengths[row] += 1
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits
