"""The KV cache: the keys and values of the tokens a model has seen, kept between forwards
so that decoding feeds one new token at a time instead of the whole sequence.

TransformerLM.new_cache makes one; each attention layer hands it its new keys and values
(update) and gets back every key and value its queries may see. It is a ring buffer, so
a model with a local attention window decodes for ever in bounded memory, and its
decoding step has the same tensor shapes every time, so it can be compiled
(speedups.CompiledDecoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of the tokens seen so far, so that decoding feeds one new token per
    forward instead of the whole sequence.

    keys[layer] and values[layer] are (batch, heads, capacity, head_dim) buffers, allocated
    once. Column c (the c-th token fed, padding included) lives in slot c % capacity, a ring
    buffer: with a window, capacity = window_size, so memory stays bounded and a key is
    overwritten just when it leaves every later query's window. Without a window the
    buffers double when full (TransformerLM.new_cache(max_length=...) sizes them up front).
    Attention does not care about the order of keys, only about their columns, which
    slot_columns records (for masks and ALiBi). An empty slot holds EMPTY, a column after
    every real one, so the causal mask alone hides it.

    A decoding step (one new token) attends over the whole buffer, the same shapes every
    step, and writes its key at a slot given as a tensor: no Python integer that changes per
    step reaches the tensor work, which is what lets speedups.CompiledDecoding compile it once.
    static_addresses marks the buffers for CUDA graphs (see _new_buffer).
    """

    EMPTY = torch.iinfo(torch.long).max

    def __init__(self, num_layers: int, batch_size: int, capacity: int, window_size: int | None,
                 static_addresses: bool = False):
        self.batch_size = batch_size
        self.static_addresses = static_addresses
        self.capacity = capacity
        self.window_size = window_size
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # columns fed so far
        self.slot_columns: torch.Tensor | None = None  # (capacity,): column in each slot, EMPTY if none
        self.key_valid: torch.Tensor | None = None  # (batch, capacity): False for padding; None if never padded
        self.real_tokens: torch.Tensor | None = None  # (batch,) real tokens so far; None if never padded
        self.slots: torch.Tensor | None = None  # (stored,): the slots this forward writes
        self._step: tuple[int, int] | None = None  # this forward's (old length, tokens stored)

    def begin(
        self, num_new: int, new_valid: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Book num_new tokens (validity (batch, num_new) or None). Returns the columns of the
        keys that update() will hand to attention (None: the same as the queries') and their
        validity (None: no padding)."""
        old = self.length
        self._make_room(old + num_new, device)
        if new_valid is not None and self.key_valid is None:
            self.key_valid = torch.ones(self.batch_size, self.capacity, dtype=torch.bool, device=device)
            self.real_tokens = torch.full((self.batch_size,), old, dtype=torch.long, device=device)
        if self.key_valid is not None and new_valid is None:
            new_valid = torch.ones(self.batch_size, num_new, dtype=torch.bool, device=device)

        new_columns = torch.arange(old, old + num_new, device=device)
        stored = min(num_new, self.capacity)
        slots = new_columns[-stored:] % self.capacity
        in_use = min(old, self.capacity)
        if num_new == 1:  # decoding: written before attending, and every slot attended (see update)
            self._store_bookkeeping(slots, new_columns, new_valid)
            key_columns, key_valid = self.slot_columns, self.key_valid
        else:
            key_columns = torch.cat((self.slot_columns[:in_use], new_columns)) if old else None
            key_valid = None
            if self.key_valid is not None:
                key_valid = torch.cat((self.key_valid[:, :in_use], new_valid), dim=1)
            self._store_bookkeeping(slots, new_columns[-stored:], new_valid[:, -stored:] if new_valid is not None else None)
        if self.real_tokens is not None:
            self.real_tokens = self.real_tokens + new_valid.sum(dim=1)
        self.slots, self._step = slots, (old, stored)
        self.length += num_new
        return key_columns, key_valid

    def _make_room(self, columns_needed: int, device: torch.device) -> None:
        """Grow the buffers (doubling, up to the window) so that columns_needed fit."""
        capacity_needed = columns_needed if self.window_size is None else min(columns_needed, self.window_size)
        if capacity_needed > self.capacity:
            grown = max(capacity_needed, 2 * self.capacity)
            self._grow(grown if self.window_size is None else min(grown, self.window_size))
        if self.slot_columns is None:
            self.slot_columns = torch.full((self.capacity,), self.EMPTY, dtype=torch.long, device=device)

    def _store_bookkeeping(self, slots: torch.Tensor, columns: torch.Tensor, valid: torch.Tensor | None) -> None:
        self.slot_columns[slots] = columns
        if valid is not None:
            self.key_valid[:, slots] = valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys and values (batch, heads, num_new, head_dim) for layer
        and return every key and value the new queries may need."""
        if self.keys[layer] is None:
            shape = (k.size(0), k.size(1), self.capacity, k.size(3))  # (batch, heads, capacity, head_dim)
            self.keys[layer] = self._new_buffer(torch.zeros(shape, dtype=k.dtype, device=k.device))
            self.values[layer] = self._new_buffer(torch.zeros(shape, dtype=v.dtype, device=v.device))
        keys, values = self.keys[layer], self.values[layer]
        if k.size(2) == 1:
            # Decoding: write into the slot (it held the column that just left the window),
            # then attend over the whole buffer; the mask hides empty slots.
            keys.index_copy_(2, self.slots, k.to(keys.dtype))
            values.index_copy_(2, self.slots, v.to(values.dtype))
            return keys, values
        old, stored = self._step
        # Several new tokens (a prompt): attend over the cached keys then the new ones, and
        # keep the last `capacity` new ones.
        in_use = min(old, self.capacity)
        k_all = torch.cat((keys[:, :, :in_use], k), dim=2) if in_use else k  # (batch, heads, in_use + new, head_dim)
        v_all = torch.cat((values[:, :, :in_use], v), dim=2) if in_use else v
        keys.index_copy_(2, self.slots, k[:, :, -stored:].to(keys.dtype))
        values.index_copy_(2, self.slots, v[:, :, -stored:].to(values.dtype))
        return k_all, v_all

    def _new_buffer(self, buffer: torch.Tensor) -> torch.Tensor:
        """A key or value buffer. For a compiled decoding step, which writes into it in place,
        its address is marked as fixed: a CUDA graph may only write into inputs whose address it
        keeps (captured once per cache)."""
        if self.static_addresses:
            torch._dynamo.mark_static_address(buffer)
        return buffer

    def _grow(self, capacity: int) -> None:
        """Enlarge the buffers. Only happens before the ring wraps, so slots are in order."""
        extra = capacity - self.capacity
        for store in (self.keys, self.values):
            for i, buffer in enumerate(store):
                if buffer is not None:
                    store[i] = self._new_buffer(F.pad(buffer, (0, 0, 0, extra)))
        if self.slot_columns is not None:
            self.slot_columns = F.pad(self.slot_columns, (0, extra), value=self.EMPTY)
        if self.key_valid is not None:
            self.key_valid = F.pad(self.key_valid, (0, extra), value=False)
        self.capacity = capacity

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reorders beams every step). Only the slots in
        use are copied."""
        in_use = min(self.length, self.capacity)
        for store in (self.keys, self.values):
            for i, buffer in enumerate(store):
                if buffer is None:
                    continue
                if index.numel() == buffer.size(0):
                    buffer[:, :, :in_use] = buffer[:, :, :in_use].index_select(0, index)
                else:  # a different number of rows: a new buffer
                    store[i] = self._new_buffer(buffer.index_select(0, index))
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, index)
            self.real_tokens = self.real_tokens.index_select(0, index)
        self.batch_size = index.numel()
