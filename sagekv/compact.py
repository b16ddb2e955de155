"""The fixed-size cache one layer decodes on after eviction.

Layout per KV head (batch 1), preallocated once at selection time:

* ``shared``: [sink | ring], S + R + 1 entries every query head of the group attends to.
  The ring starts as the R recent prompt tokens plus the last one; each decoded token
  overwrites its oldest entry, so the size never changes.
* ``selected``: the top-k entries, [Hkv, rows per KV head, k, D]. With per-query-head
  selection each query head reads only its own k rows, so sink and recent entries are
  never copied G times.

Decode attention scores the two parts separately and normalises them with one softmax over
their concatenated logits, which is exactly attention over the union of kept positions.
"""

from __future__ import annotations

import numpy as np

from .errors import SageKVError
from .selection import kept_positions


class CompactKV:
    def __init__(self, ops, layout, positions, keys, values):
        """``positions``: kept positions [rows, S+k+R+1]; ``keys``/``values``: full [1, Hkv, N, D]."""
        self.ops, self.layout = ops, layout
        s, k, r, n = layout.sink, layout.topk, layout.recent, layout.n
        self.ring_start, self.ring_size = s, r + 1
        self.shared_k = ops.concat([keys[:, :, :s], keys[:, :, n - 1 - r :]], axis=2)
        self.shared_v = ops.concat([values[:, :, :s], values[:, :, n - 1 - r :]], axis=2)
        self.selected_k = self.selected_v = None
        if k:
            rows = layout.groups_per_kv
            index = positions[:, s : s + k].reshape(layout.kv_heads, rows, k)
            head = ops.arange(0, layout.kv_heads, like=index).reshape(layout.kv_heads, 1, 1)
            self.selected_k = keys[0][head, index][None]  # advanced indexing copies
            self.selected_v = values[0][head, index][None]
        self.shared_positions = np.concatenate([np.arange(s), np.arange(n - 1 - r, n)])
        self.selected_positions = ops.to_numpy(positions[:, s : s + k]).astype(np.int64)
        self.next_slot = 0  # ring slot holding the oldest entry
        self.next_position = n

    @classmethod
    def from_prefill(cls, policy, ops, query, keys, values):
        """Select and build, or return None when the policy keeps everything.

        ``query``: [Hq, D] last prompt token's query; ``keys``/``values``: [1, Hkv, N, D].
        """
        if keys.shape[0] != 1:
            raise SageKVError("eviction supports batch size 1")
        layout = policy.layout(keys.shape[2], query.shape[0], keys.shape[1])
        if not layout.evicts:
            return None
        positions = kept_positions(policy, ops, query, keys[0], layout)
        return cls(ops, layout, positions, keys, values)

    def append(self, key, value):
        """Write one decoded token's key/value [1, Hkv, 1, D] over the oldest ring entry."""
        if key.shape[2] != 1:
            raise SageKVError("after eviction the cache takes one token per step")
        slot = self.ring_start + self.next_slot
        self.shared_k[:, :, slot : slot + 1] = key
        self.shared_v[:, :, slot : slot + 1] = value
        self.shared_positions[slot] = self.next_position
        self.next_slot = (self.next_slot + 1) % self.ring_size
        self.next_position += 1

    def attend(self, queries, scale):
        """Attention of one query token [1, Hq, 1, D] over the kept entries."""
        ops, lay = self.ops, self.layout
        b, hq, length, d = queries.shape
        if length != 1:
            raise SageKVError("after eviction the cache takes one token per step")
        g = hq // lay.kv_heads
        q = queries.reshape(1, lay.kv_heads, g, d)
        logits = [ops.float32(q @ self.shared_k.swapaxes(-1, -2))]  # [1, Hkv, G, S+R+1]
        if self.selected_k is not None:
            sel = q[:, :, :, None] @ self.selected_k.swapaxes(-1, -2)  # [1, Hkv, G, 1, k]
            logits.append(ops.float32(sel.reshape(1, lay.kv_heads, g, lay.topk)))
        probs = ops.softmax(ops.concat(logits, axis=-1) * scale)
        shared = self.shared_k.shape[2]
        out = ops.astype_like(probs[..., :shared], self.shared_v) @ self.shared_v
        if self.selected_k is not None:
            p_sel = ops.astype_like(probs[..., shared:], self.selected_v)[:, :, :, None]
            out = out + (p_sel @ self.selected_v).reshape(out.shape)
        return ops.astype_like(out.reshape(1, hq, 1, d), queries)

    def kept(self):
        """Positions each row attends to now, sorted: [rows, S+k+R+1] (numpy)."""
        rows = self.layout.rows
        shared = np.broadcast_to(self.shared_positions, (rows, self.shared_positions.size))
        return np.sort(np.concatenate([shared, self.selected_positions], axis=1), axis=1)

    @property
    def arrays(self) -> list:
        """Every buffer this cache holds."""
        held = [self.shared_k, self.shared_v, self.selected_k, self.selected_v]
        return [a for a in held if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(self.ops.nbytes(a) for a in self.arrays)
