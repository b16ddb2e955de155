"""The fixed-size cache one layer decodes on after eviction.

Layout per KV head (batch 1), preallocated once at selection time:

* ``shared``: [sink | selected shared by the group | ring], what every query head of the
  group attends to. The ring starts as the R recent prompt tokens plus the last one; each
  decoded token overwrites its oldest entry, so the size never changes.
* ``selected``: only with per-query-head selection, [Hkv, G, k, D]: each query head reads its
  own k rows, so sink and recent entries are never copied G times.

Without a per-head part, decode is one fused GQA attention over ``shared``. With one, the two
parts are scored separately and normalised by one softmax over their concatenated logits,
which is exactly attention over the union of kept positions.
"""

from __future__ import annotations

import numpy as np

from .errors import SageKVError
from .selection import kept_positions


class CompactKV:
    def __init__(self, ops, layout, positions, keys, values):
        """``positions``: kept positions [rows, S+k+R+1]; ``keys``/``values``: full [1, Hkv, N, D]."""
        self.ops, self.layout = ops, layout
        s, k, r, n, hkv = layout.sink, layout.topk, layout.recent, layout.n, layout.kv_heads
        self.per_head = layout.groups_per_kv > 1 and k > 0
        index = positions[:, s : s + k].reshape(hkv, layout.groups_per_kv, k)
        head = ops.arange(0, hkv, like=index).reshape(hkv, 1, 1)
        pick = lambda x: x[0][head, index][None]  # noqa: E731  advanced indexing copies
        parts = lambda x, middle: [x[:, :, :s], *middle, x[:, :, n - 1 - r :]]  # noqa: E731
        if self.per_head:
            self.selected_k, self.selected_v = pick(keys), pick(values)  # [1, Hkv, G, k, D]
            middle_k = middle_v = []
        else:
            self.selected_k = self.selected_v = None
            middle_k, middle_v = ([pick(keys)[:, :, 0]], [pick(values)[:, :, 0]]) if k else ([], [])
        self.shared_k = ops.concat(parts(keys, middle_k), axis=2)
        self.shared_v = ops.concat(parts(values, middle_v), axis=2)

        selected = ops.to_numpy(positions[:, s : s + k]).astype(np.int64)
        shared_selected = np.zeros((hkv, 0), np.int64) if self.per_head else selected.reshape(hkv, k)
        fixed = lambda first, stop: np.broadcast_to(np.arange(first, stop), (hkv, stop - first))  # noqa: E731
        self.shared_positions = np.concatenate([fixed(0, s), shared_selected, fixed(n - 1 - r, n)], axis=1)
        self.selected_positions = selected if self.per_head else None
        self.ring_start, self.ring_size = self.shared_positions.shape[1] - (r + 1), r + 1
        self.next_slot = 0  # ring slot holding the oldest entry
        self.length = n  # tokens seen: the next token's position

    @classmethod
    def from_prefill(cls, policy, ops, queries, keys, values):
        """Select and build, or return None when the policy keeps everything.

        ``queries``: [Hq, W, D] the last prompt queries; ``keys``/``values``: [1, Hkv, N, D].
        """
        if keys.shape[0] != 1:
            raise SageKVError("eviction supports batch size 1")
        layout = policy.layout(keys.shape[2], queries.shape[0], keys.shape[1])
        if not layout.evicts:
            return None
        positions = kept_positions(policy, ops, queries, keys[0], layout)
        return cls(ops, layout, positions, keys, values)

    def append(self, key, value):
        """Write one decoded token's key/value [1, Hkv, 1, D] over the oldest ring entry."""
        if key.shape[2] != 1:
            raise SageKVError("after eviction the cache takes one token per step")
        slot = self.ring_start + self.next_slot
        self.shared_k[:, :, slot : slot + 1] = key
        self.shared_v[:, :, slot : slot + 1] = value
        self.shared_positions[:, slot] = self.length
        self.next_slot = (self.next_slot + 1) % self.ring_size
        self.length += 1

    def attend(self, queries, scale):
        """Attention of one query token [1, Hq, 1, D] over the kept entries."""
        ops, hkv = self.ops, self.layout.kv_heads
        _, hq, length, d = queries.shape
        if length != 1:
            raise SageKVError("after eviction the cache takes one token per step")
        if not self.per_head:
            return ops.attention(queries, self.shared_k, self.shared_v, scale)
        q = queries.reshape(1, hkv, hq // hkv, d) * scale
        out = two_part_attention(ops, q, self.shared_k, self.shared_v, self.selected_k, self.selected_v)
        return out.reshape(1, hq, 1, d)

    def kept(self):
        """Positions each row attends to now, sorted: [rows, S+k+R+1] (numpy)."""
        if not self.per_head:
            return np.sort(self.shared_positions, axis=1)
        shared = np.repeat(self.shared_positions, self.layout.groups_per_kv, axis=0)
        return np.sort(np.concatenate([shared, self.selected_positions], axis=1), axis=1)

    @property
    def arrays(self) -> list:
        """Every buffer this cache holds."""
        held = [self.shared_k, self.shared_v, self.selected_k, self.selected_v]
        return [a for a in held if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(self.ops.nbytes(a) for a in self.arrays)


def two_part_attention(ops, q, shared_k, shared_v, selected_k, selected_v):
    """Attention of scaled queries q [1, Hkv, G, D] over each KV head's shared entries and each
    query head's own selected entries [1, Hkv, G, k, D], normalised by one softmax."""
    shared_logits = q @ shared_k.swapaxes(-1, -2)  # [1, Hkv, G, S+R+1]
    selected_logits = (q[:, :, :, None] @ selected_k.swapaxes(-1, -2))[:, :, :, 0]  # [1, Hkv, G, k]
    probs = ops.softmax(ops.concat([shared_logits, selected_logits], axis=-1))
    shared = shared_k.shape[2]
    out = ops.astype_like(probs[..., :shared], shared_v) @ shared_v
    p_selected = ops.astype_like(probs[..., shared:], selected_v)[:, :, :, None]
    out = out + (p_selected @ selected_v)[:, :, :, 0]
    return ops.astype_like(out, q)
