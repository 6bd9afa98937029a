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
        same_length = all(len(p) == width for p in prompts)
        out = self._model(
            input_ids=ids.to(device),
            use_cache=True,
            # Only the last position's logits are needed; with rows of several lengths, each
            # row's own last one is picked below.
            logits_to_keep=1 if same_length else 0,
            **cache.prefill_args(first, list(starts), width),
        )
        for row, (prompt, start) in enumerate(zip(prompts, starts, strict=True)):
            cache.lengths[first + row] = start + len(prompt)
        if same_length:
            last: torch.Tensor = out.logits[:, -1, :]
        else:
            ends = torch.tensor([len(p) - 1 for p in prompts], device=device)
            last = out.logits[torch.arange(len(prompts), device=device), ends]
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
