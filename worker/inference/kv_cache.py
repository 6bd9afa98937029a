"""The keys and values of every turn in flight, in one cache allocated once per worker.

Each layer's keys and values live in a tensor [slots, heads, capacity, head_dim] allocated on
the first forward pass (shapes and dtype from the model's own key states, so any architecture
fits) and never again: a turn owns a slot, its tokens are columns 0..length-1 of it, and
joining, stepping and leaving write in place. The running batch is slots 0..n-1, so a decoding
step reads one view of the first n slots; a turn that leaves is replaced by the last one (a
copy of one row), and nothing is concatenated per step.

Rows have their own lengths: a decoding step writes each row's new token at its own column
and the attention mask (4D, handed to the model as is) hides the columns past a row's length.
Positions are a row's own token count, so a row computes the keys, values and logits it would
alone. The last slot is a staging slot, where a prompt too long for one step's prefill budget
is prefilled chunk by chunk between decoding steps, then moved into the batch.

This module alone knows how the cache is stored; the model runner hands `SlotCache.forward_args`
to the model. The per-layer objects are transformers cache layers, so the model's own attention
(SDPA, eager, ...) reads them as it reads its own caches.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from worker.inference.prefix_cache import Layers

# Columns zeroed at a time as turns grow (see SlotCache._clean).
_ZERO_COLUMNS = 64
# A kept prefix's buffers get a quarter more room than its tokens, plus this many
# columns more, for its conversation's next turns (see SlotCache.row_prefix).
_MIN_ROOM_TO_GROW = 64


class SlotCache:
    def __init__(self, *, slots: int, capacity: int, device: torch.device) -> None:
        self.slots = slots  # the batch's slots, then one staging slot
        self.capacity = capacity  # tokens a slot holds: the model's context window
        self.device = device
        self.lengths = [0] * (slots + 1)
        self._keys: list[torch.Tensor] = []  # per layer [slots + 1, heads, capacity, head_dim]
        self._values: list[torch.Tensor] = []
        # Columns 0..clean-1 of every slot hold numbers. Masked columns are still multiplied
        # (by a weight of 0) in attention, and 0 x NaN is NaN, so a column is zeroed before it
        # is first read; the buffers are not zeroed whole, so memory is touched only as far as
        # the longest turn has reached.
        self._clean = 0

    @property
    def staging(self) -> int:
        return self.slots

    # -- forward passes --------------------------------------------------------------------

    def decode_args(self, rows: int) -> dict[str, Any]:
        """Arguments for one new token in each of slots 0..rows-1, written at its own column."""
        lengths = torch.tensor(self.lengths[:rows], device=self.device)
        width = max(self.lengths[:rows]) + 1
        self._zero_up_to(width)
        columns = torch.arange(width, device=self.device)
        # Row r sees its `lengths[r]` cached tokens and the one it is writing now.
        mask = (columns[None, :] <= lengths[:, None])[:, None, None, :]
        write = _Write(self, torch.arange(rows, device=self.device), lengths, slice(0, rows), width)
        return {
            "attention_mask": mask,
            "position_ids": lengths[:, None],
            "cache": _CacheView(write, len(self._keys)),
        }

    def prefill_args(self, first: int, starts: list[int], tokens: int) -> dict[str, Any]:
        """Arguments for ``tokens`` new columns (right padded) in slots ``first``.., one row
        per start: row r's are written from column ``starts[r]``, the tokens its slot already
        holds (a cached prefix of its own length, or 0)."""
        end = max(starts) + tokens
        if end > self.capacity:
            raise ValueError(f"{end} tokens exceed the slot capacity {self.capacity}")
        self._zero_up_to(end)
        slots = slice(first, first + len(starts))
        if len(set(starts)) == 1:
            start = starts[0]
            new = torch.arange(start, start + tokens, device=self.device)
            columns = torch.arange(end, device=self.device)
            mask = (columns[None, :] <= new[:, None])[None, None, :, :]  # causal, from `start`
            write = _Write(self, slots, start, slots, end)
            positions = new[None, :].expand(len(starts), -1)
        else:
            # Each row's new tokens at its own columns: [rows, tokens] of positions.
            offsets = torch.tensor(starts, device=self.device)
            positions = offsets[:, None] + torch.arange(tokens, device=self.device)[None, :]
            columns = torch.arange(end, device=self.device)
            mask = (columns[None, None, :] <= positions[:, :, None])[:, None, :, :]
            rows = torch.arange(first, first + len(starts), device=self.device)[:, None]
            write = _Write(self, rows, positions, slots, end)
        return {
            "attention_mask": mask,
            "position_ids": positions,
            "cache": _CacheView(write, len(self._keys)),
        }

    def _zero_up_to(self, width: int) -> None:
        if width <= self._clean:
            return
        width = min(self.capacity, max(width, self._clean + _ZERO_COLUMNS))
        for buffer in (*self._keys, *self._values):
            buffer[:, :, self._clean : width] = 0
        self._clean = width

    def _allocate(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The layer's buffers, shaped by its first key and value states."""
        assert layer == len(self._keys), "layers are allocated in order on the first pass"
        _, heads, _, key_dim = keys.shape
        shape = (self.slots + 1, heads, self.capacity, key_dim)
        value_shape = (self.slots + 1, heads, self.capacity, values.shape[-1])
        for buffers, buffer in (
            (self._keys, torch.empty(shape, dtype=keys.dtype, device=keys.device)),
            (self._values, torch.empty(value_shape, dtype=values.dtype, device=values.device)),
        ):
            buffer[:, :, : self._clean] = 0
            buffers.append(buffer)

    # -- rows ------------------------------------------------------------------------------

    def move(self, source: int, target: int) -> None:
        """Copy slot ``source``'s tokens into slot ``target`` (which becomes its row)."""
        length = self.lengths[source]
        for buffers in (self._keys, self._values):
            for layer in buffers:
                layer[target, :, :length] = layer[source, :, :length]
        self.lengths[target] = length

    def compact(self, keep: list[int]) -> list[int]:
        """Keep the rows ``keep`` of slots 0..n-1 as slots 0..len(keep)-1: each hole left by a
        row that goes is filled by a kept row from past the end. Returns the old row of each
        new row, in order."""
        kept = len(keep)
        order = list(range(kept))
        staying = set(keep)
        holes = [row for row in range(kept) if row not in staying]
        movers = [row for row in keep if row >= kept]
        for hole, mover in zip(holes, movers, strict=True):
            self.move(mover, hole)
            order[hole] = mover
        return order

    def row_prefix(self, slot: int, *, reuse: Layers | None = None) -> tuple[int, Layers]:
        """A slot's tokens: how many, and copies of their keys and values (batch of one,
        [1, heads, tokens, head_dim]) to outlive the turn in the prefix cache.

        The copies go into the buffers under ``reuse`` (the kept prefix this one replaces)
        when those have room, else into new buffers with room to grow: a conversation's next
        turns are longer. At 2,000 tokens of the small model a turn's copy is 160 MB, which
        cost 30-250 ms allocated afresh (the pages faulted in) and 5 ms into warm buffers."""
        length = self.lengths[slot]
        buffers = _whole(reuse, length) if reuse is not None else None
        if buffers is None:
            room = min(self.capacity, length + length // 4 + _MIN_ROOM_TO_GROW)
            buffers = [
                (
                    k.new_empty((1, k.shape[1], room, k.shape[3])),
                    v.new_empty((1, v.shape[1], room, v.shape[3])),
                )
                for k, v in zip(self._keys, self._values, strict=True)
            ]
        layers = []
        for (key_copy, value_copy), k, v in zip(buffers, self._keys, self._values, strict=True):
            key_copy[0, :, :length] = k[slot, :, :length]
            value_copy[0, :, :length] = v[slot, :, :length]
            layers.append((key_copy[:, :, :length], value_copy[:, :, :length]))
        return length, layers

    def load_prefix(self, slot: int, layers: Layers, length: int) -> bool:
        """Write a cached prefix of ``length`` tokens into ``slot``; False when the buffers do
        not exist yet (no forward pass has run: the prefix is prefilled instead)."""
        if len(self._keys) != len(layers):
            return False
        for (k, v), key_buffer, value_buffer in zip(layers, self._keys, self._values, strict=True):
            key_buffer[slot, :, :length] = k[0, :, :length]
            value_buffer[slot, :, :length] = v[0, :, :length]
        self.lengths[slot] = length
        return True


def _whole(layers: Layers, tokens: int) -> Layers | None:
    """The whole buffers under kept keys and values (views [1, heads, n, head_dim] of buffers
    [1, heads, room, head_dim], as row_prefix makes them), if they have room for ``tokens``."""
    first = layers[0][0]
    room = first.stride(1) // first.stride(2)
    if room < tokens or first.stride(3) != 1:
        return None
    return [
        (
            k.as_strided((1, k.shape[1], room, k.shape[3]), k.stride()),
            v.as_strided((1, v.shape[1], room, v.shape[3]), v.stride()),
        )
        for k, v in layers
    ]


class _Write:
    """Where one forward pass writes its new keys and values, and what it reads back."""

    def __init__(
        self,
        cache: SlotCache,
        rows: torch.Tensor | slice,
        columns: torch.Tensor | int,
        read: slice,
        width: int,
    ) -> None:
        self.cache = cache
        self.rows = rows  # decode: each row's slot [rows]; prefill: the slots' range, or
        # for rows of their own starts each row's slot [rows, 1]
        self.columns = columns  # decode: each row's column [rows]; prefill: the first new
        # column, or each row's new columns [rows, tokens]
        self.read = read  # the slots attention reads, columns 0..width-1
        self.width = width

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        if layer == len(cache._keys):
            cache._allocate(layer, keys, values)
        key_buffer, value_buffer = cache._keys[layer], cache._values[layer]
        if isinstance(self.columns, int):
            end = self.columns + keys.shape[2]
            key_buffer[self.rows, :, self.columns : end] = keys
            value_buffer[self.rows, :, self.columns : end] = values
        elif self.columns.dim() == 2:
            # Indexed [rows, tokens, heads, dim]: the states' heads and tokens swap places.
            key_buffer[self.rows, :, self.columns] = keys.transpose(1, 2)
            value_buffer[self.rows, :, self.columns] = values.transpose(1, 2)
        else:
            key_buffer[self.rows, :, self.columns] = keys[:, :, 0]
            value_buffer[self.rows, :, self.columns] = values[:, :, 0]
        return key_buffer[self.read, :, : self.width], value_buffer[self.read, :, : self.width]


# transformers' cache classes are unannotated: subclassing and initialising them is untyped.
class _SlotLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One layer's view of the slot cache for one forward pass."""

    def __init__(self, write: _Write, layer: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._write = write
        self._layer = layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the slot cache allocates its buffers on the first write

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._write.update(self._layer, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._write.width, 0

    def get_seq_length(self) -> int:
        return self._write.width

    def get_max_length(self) -> int:
        return self._write.cache.capacity


class _CacheView(Cache):
    """The transformers Cache a forward pass is handed: its layers write into the slots."""

    def __init__(self, write: _Write, layers: int) -> None:
        # Before the first pass the layer count is unknown (0): layers are added as the model
        # reaches them (a layer index past the list adds the next one).
        super().__init__(layers=[_SlotLayer(write, i) for i in range(layers)])
        self._write_target = write

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(_SlotLayer(self._write_target, len(self.layers)))
        return self._write_target.update(layer_idx, key_states, value_states)
