"""The keys and values of a batch's rows, with their attention mask and positions.

Rows are left padded to a common width: a row's real tokens are its last columns, the mask
says which columns are real, and positions count real tokens only, so a padded row sees the
positions (and computes the keys, values and logits) it would alone. A prefilled group is one
`BatchCache`; the running batch is another, which groups join and finished rows leave.

This module alone knows how the cache is stored (a transformers DynamicCache of per-layer
tensors [batch, heads, length, head_dim]); the model runner only hands `forward_args` to the
model and the output's cache back to `update`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from worker.inference.prefix_cache import Layers


class BatchCache:
    def __init__(self, cache: Any, mask: torch.Tensor) -> None:
        # A transformers DynamicCache (typed Any: its layer classes are partly annotated).
        self._cache = cache
        self._mask = mask  # [rows, width], 1 for a real token, 0 for left padding

    @classmethod
    def for_prompts(
        cls, prompts: Sequence[Sequence[int]], *, pad_token_id: int, device: torch.device
    ) -> tuple[torch.Tensor, BatchCache]:
        """The prompts' input ids left padded to the longest, and an empty cache for them."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        return ids.to(device), cls(DynamicCache(), mask.to(device))

    @classmethod
    def after_prefix(cls, layers: Layers, total: int, *, device: torch.device) -> BatchCache:
        """One row holding a cached prefix (``layers``) of a prompt of ``total`` tokens, the
        rest of which is to be run through the model."""
        mask = torch.ones((1, total), dtype=torch.long, device=device)
        return cls(DynamicCache(layers), mask)

    @property
    def rows(self) -> int:
        return int(self._mask.shape[0])

    def forward_args(self, new_tokens: int) -> dict[str, Any]:
        """The model's arguments beside input_ids for the last ``new_tokens`` columns."""
        return {
            "attention_mask": self._mask,
            "position_ids": _positions(self._mask)[:, -new_tokens:],
            "past_key_values": self._cache,
        }

    def update(self, cache: Any) -> None:
        """Take the cache a forward pass returned (the old one grown by its new tokens)."""
        self._cache = cache

    def extend(self) -> None:
        """Add a column for one more token in every row (the one the next step feeds)."""
        self._mask = torch.cat([self._mask, self._mask.new_ones((self.rows, 1))], dim=1)

    def join(self, other: BatchCache) -> None:
        """Append ``other``'s rows, left-padding whichever side is shorter."""
        width = max(self._mask.shape[1], other._mask.shape[1])
        self._cache = DynamicCache(
            [
                (
                    torch.cat([_pad_left(old_k, width), _pad_left(new_k, width)]),
                    torch.cat([_pad_left(old_v, width), _pad_left(new_v, width)]),
                )
                for (old_k, old_v), (new_k, new_v) in zip(
                    _layers(self._cache), _layers(other._cache), strict=True
                )
            ]
        )
        self._mask = torch.cat([_pad_mask(self._mask, width), _pad_mask(other._mask, width)])

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows``, in that order, then drop the padding they all share."""
        index = torch.tensor(rows, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._trim_common_padding()

    def row_prefix(self, row: int) -> tuple[int, Layers]:
        """A row's real tokens: how many, and copies of their keys and values (batch of one),
        to outlive the batch in the prefix cache."""
        length = int(self._mask[row].sum())
        layers = [
            (k[row : row + 1, :, -length:].clone(), v[row : row + 1, :, -length:].clone())
            for k, v in _layers(self._cache)
        ]
        return length, layers

    def _trim_common_padding(self) -> None:
        """Drop left columns that are padding in every row, so the cache does not only grow."""
        first = int(self._mask.any(dim=0).int().argmax())
        if first == 0:
            return
        self._mask = self._mask[:, first:]
        self._cache = DynamicCache(
            [(k[:, :, first:], v[:, :, first:]) for k, v in _layers(self._cache)]
        )


def _layers(cache: Any) -> Layers:
    """Each layer's key and value states, [batch, heads, length, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Absolute positions count real tokens only, so a left-padded row sees the positions it
    # would see alone.
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - states.shape[-2]
    return states if missing == 0 else F.pad(states, (0, 0, missing, 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else F.pad(mask, (missing, 0))
