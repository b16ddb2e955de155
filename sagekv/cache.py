"""Every decode cache: what one layer decodes on after prefill, once a policy has chosen.

Each is a :class:`DecodeCache`: it takes one token's key/value per step (``append``), answers
that token's attention (``attend``), and can be taken apart into arrays and plain settings
(``state``, ``meta``) and put back together (``from_state``, or :func:`cache_from_state`,
which reads the class from ``meta["kind"]``), as mlx-lm's prompt caches do.

* :class:`CompactKV`: the fixed-size cache of an evicting policy.
* :class:`QuestKV`: Quest's full cache in pages, with each page's key bounds.
* :class:`SegmentKV`: a cache assembled from stored document segments (sagekv.rag), repaired by
  recomputing chosen rows, then decoded on.
* :class:`BatchKV`: several sequences' caches of one layer stacked along the batch axis, decoded
  together (:meth:`sagekv.SageModel.generate_batch`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, fields
from typing import ClassVar, Optional

import numpy as np

from .errors import SageKVError
from .policies.base import Layout
from .selection import kept_positions


class DecodeCache(ABC):
    """What every decode cache provides.

    ``held`` names the array attributes that are the cache's ``state``; ``meta`` holds the
    plain settings (ints, strings, lists) that complete it, ``kind`` naming the class.
    """

    held: ClassVar[tuple]
    buffers: ClassVar[tuple] = ()  # the held arrays counted as KV memory (:attr:`arrays`)
    ops: type  # the Ops of the arrays' library
    length: int  # tokens seen: the next token's position
    growth: ClassVar[int] = 256  # rows added per reallocation, for caches that grow
    # whether a decode step is the same work on the same arrays every step (a fixed size, counters on the
    # device), so a captured graph of it can replay (backends/torch.py StepGraph)
    static: ClassVar[bool] = False

    @property
    def lengths(self) -> list:
        """Each sequence's next position, one per batch row."""
        return [self.length]

    def grown(self, x, extra: int):
        """``x`` [1, Hkv, T, D] with ``extra`` zero rows of room appended along T."""
        spare = self.ops.full((*x.shape[:2], extra, x.shape[3]), 0.0, like=x)
        return self.ops.concat([x, spare], axis=2)

    @abstractmethod
    def append(self, key, value):
        """Take one decoded token's key/value [1, Hkv, 1, D]."""

    @abstractmethod
    def attend(self, queries, scale):
        """Attention of one query token [1, Hq, 1, D] over what the cache keeps: [1, Hq, 1, D]."""

    def kept(self):
        """Positions each row attends to now, sorted [rows, kept] (numpy), or None when it keeps all."""
        return self.kept_from([self.ops.to_numpy(array) for array in self.position_arrays])

    @property
    def position_arrays(self) -> list:
        """The library arrays that :meth:`kept` reads, if the cache holds its positions there."""
        return []

    @abstractmethod
    def kept_from(self, positions: list):
        """:meth:`kept` from numpy copies of :attr:`position_arrays`."""

    @property
    def arrays(self) -> list:
        """The buffers counted as KV memory: those named in ``buffers`` that it holds."""
        return [a for a in (getattr(self, name) for name in self.buffers) if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(self.ops.nbytes(a) for a in self.arrays)

    @property
    def state(self) -> dict:
        """Every array the cache holds, by name (the arrays themselves, not copies)."""
        held = {name: getattr(self, name) for name in self.held}
        return {name: array for name, array in held.items() if array is not None}

    @property
    def meta(self) -> dict:
        """The plain settings that, with ``state``, make up the cache."""
        return {"kind": type(self).__name__, "length": self.length}

    @classmethod
    def from_state(cls, ops, arrays: dict, meta: dict):
        """The cache that ``state`` and ``meta`` were read from; it adopts ``arrays`` (no copy)."""
        cache = cls.__new__(cls)  # the state is what __init__ computed: nothing to redo
        cache.ops, cache.length = ops, meta["length"]
        for name in cls.held:
            setattr(cache, name, arrays.get(name))
        return cache

    def copy(self) -> "DecodeCache":
        """A copy sharing no array with this cache (decoding writes into its arrays in place)."""
        return type(self).from_state(self.ops, {name: self.ops.copy(a) for name, a in self.state.items()}, self.meta)


def kept_of(ops, decoders: list) -> list:
    """Each decoder's :meth:`~DecodeCache.kept` (None for a layer without one), every layer's
    position arrays read from the device in one transfer rather than one per layer."""
    held = [[] if decoder is None else decoder.position_arrays for decoder in decoders]
    arrays = [array for layer in held for array in layer]
    flat = ops.to_numpy(ops.concat([a.reshape(-1) for a in arrays], axis=0)) if arrays else None
    kept, start = [], 0
    for decoder, layer in zip(decoders, held):
        positions = []
        for array in layer:
            size = int(np.prod(array.shape))
            positions.append(flat[start : start + size].reshape(tuple(array.shape)))
            start += size
        kept.append(None if decoder is None else decoder.kept_from(positions))
    return kept


def cache_from_state(ops, arrays: dict, meta: dict) -> DecodeCache:
    """Rebuild a decode cache of any kind from its ``state`` and ``meta``."""
    kinds = {kind.__name__: kind for kind in DecodeCache.__subclasses__()}
    if meta.get("kind") not in kinds:
        raise SageKVError(f"unknown decode cache kind {meta.get('kind')!r} (known: {', '.join(kinds)})")
    return kinds[meta["kind"]].from_state(ops, arrays, meta)


def full_layer(keys, values, queries=None) -> dict:
    """A layer that keeps its whole cache, as backends take a cache apart and put it together
    (``unwrap``, ``wrap``): its keys and values [1, Hkv, N, D] and, until a policy has selected, its
    last prompt queries [Hq, W, D]."""
    return {"keys": keys, "values": values, **({} if queries is None else {"queries": queries})}


class CompactKV(DecodeCache):
    """The fixed-size cache one layer decodes on after eviction.

    Layout per KV head (batch 1), preallocated once at selection time:

    * ``shared``: [sink | selected shared by the group | ring], what every query head of the
      group attends to. The ring starts as the R recent prompt tokens plus the last one; each
      decoded token overwrites its oldest entry, so the size never changes.
    * ``selected``: only with per-query-head selection, [Hkv, G, k, D]: each query head reads
      its own k rows, so sink and recent entries are never copied G times.

    Without a per-head part, decode is one fused GQA attention over ``shared``. With one, the
    two parts are scored separately and normalised by one softmax over their concatenated
    logits, which is exactly attention over the union of kept positions.
    """

    held = ("shared_k", "shared_v", "shared_positions", "step", "selected_k", "selected_v", "selected_positions")
    buffers = ("shared_k", "shared_v", "selected_k", "selected_v")
    static = True

    def __init__(self, ops, layout, positions, keys, values):
        """``positions``: kept positions [rows, S+k+R+1]; ``keys``/``values``: full [1, Hkv, N, D]."""
        self.ops, self.layout = ops, layout
        s, k, r, n, hkv = layout.sink, layout.topk, layout.recent, layout.n, layout.kv_heads
        per_head = layout.groups_per_kv > 1 and k > 0
        index = positions[:, s : s + k].reshape(hkv, layout.groups_per_kv, k)
        head = ops.arange(0, hkv, like=index).reshape(hkv, 1, 1)
        pick = lambda x: x[0][head, index][None]  # noqa: E731  advanced indexing copies
        parts = lambda x, middle: [x[:, :, :s], *middle, x[:, :, n - 1 - r :]]  # noqa: E731
        if per_head:
            self.selected_k, self.selected_v = pick(keys), pick(values)  # [1, Hkv, G, k, D]
            middle_k = middle_v = []
        else:
            self.selected_k = self.selected_v = None
            middle_k, middle_v = ([pick(keys)[:, :, 0]], [pick(values)[:, :, 0]]) if k else ([], [])
        self.shared_k = ops.concat(parts(keys, middle_k), axis=2)
        self.shared_v = ops.concat(parts(values, middle_v), axis=2)

        # Positions stay arrays on the device, as does the step count the ring slot comes from, so
        # append indexes with arrays only; sink and ring are the same in every row of a group.
        first = positions.reshape(hkv, layout.groups_per_kv, -1)[:, 0]
        sink, selected, ring = first[:, :s], first[:, s : s + k], first[:, s + k :]
        self.shared_positions = ops.concat([sink, ring] if per_head else [sink, selected, ring], axis=1)
        self.selected_positions = positions[:, s : s + k] if per_head else None
        self.step = ops.full((1,), 0, like=self.shared_positions)  # tokens appended since selection
        self.appended = 0  # the same count on the host, kept where it is used (Ops.host_slots)
        self.length = n  # the same count on the host, n + step, for position ids without a device read

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

    @property
    def per_head(self) -> bool:
        """Whether each query head has selected entries of its own."""
        return self.selected_k is not None

    @property
    def ring_size(self) -> int:
        return self.layout.recent + 1

    @property
    def ring_start(self) -> int:
        return self.shared_positions.shape[1] - self.ring_size

    def append(self, key, value):
        """Write one decoded token's key/value [1, Hkv, 1, D] over the oldest ring entry."""
        if key.shape[2] != 1:
            raise SageKVError("after eviction the cache takes one token per step")
        ops, hkv = self.ops, self.layout.kv_heads
        if ops.host_slots:
            first = self.appended % self.ring_size + self.ring_start  # the oldest entry
            slot, position = slice(first, first + 1), self.appended + self.layout.n
            self.appended += 1  # only here: a replayed graph step (torch) runs none of this Python
        else:
            slot = self.step % self.ring_size + self.ring_start
            position = ops.xp.broadcast_to(self.step + self.layout.n, (hkv, 1))
        ops.write(self.shared_k, 2, slot, key)
        ops.write(self.shared_v, 2, slot, value)
        ops.write(self.shared_positions, 1, slot, position)
        self.step += 1
        self.length += 1

    def attend(self, queries, scale):
        ops, hkv = self.ops, self.layout.kv_heads
        _, hq, length, d = queries.shape
        if length != 1:
            raise SageKVError("after eviction the cache takes one token per step")
        if not self.per_head:
            return ops.attention(queries, self.shared_k, self.shared_v, scale)
        q = queries.reshape(1, hkv, hq // hkv, d) * scale
        out = two_part_attention(ops, q, self.shared_k, self.shared_v, self.selected_k, self.selected_v)
        return out.reshape(1, hq, 1, d)

    @property
    def position_arrays(self) -> list:
        return [self.shared_positions] + ([self.selected_positions] if self.per_head else [])

    def kept_from(self, positions: list):
        shared = positions[0].astype(np.int64)
        if not self.per_head:
            return np.sort(shared, axis=1)
        shared = np.repeat(shared, self.layout.groups_per_kv, axis=0)
        return np.sort(np.concatenate([shared, positions[1].astype(np.int64)], axis=1), axis=1)

    @property
    def meta(self) -> dict:
        return {**super().meta, **asdict(self.layout)}

    @classmethod
    def from_state(cls, ops, arrays: dict, meta: dict):
        cache = super().from_state(ops, arrays, meta)
        cache.layout = Layout(**{field.name: meta[field.name] for field in fields(Layout)})
        cache.appended = int(ops.to_numpy(cache.step)[0]) if ops.host_slots else 0  # read only where it is used
        return cache


def two_part_attention(ops, q, shared_k, shared_v, selected_k, selected_v, shared_mask=None, selected_mask=None):
    """Attention of scaled queries q [B, Hkv, G, D] over each KV head's shared entries and each
    query head's own selected entries [B, Hkv, G, k, D], normalised by one softmax. The masks
    ([B, 1, 1, S] and [B, 1, 1, 1], True: attend) leave out a batch's padding."""
    shared_logits = q @ shared_k.swapaxes(-1, -2)  # [B, Hkv, G, S+R+1]
    selected_logits = (q[:, :, :, None] @ selected_k.swapaxes(-1, -2))[:, :, :, 0]  # [B, Hkv, G, k]
    if shared_mask is not None:
        shared_logits = ops.xp.where(shared_mask, shared_logits, -math.inf)
    if selected_mask is not None:
        selected_logits = ops.xp.where(selected_mask, selected_logits, -math.inf)
    probs = ops.softmax(ops.concat([shared_logits, selected_logits], axis=-1))
    shared = shared_k.shape[2]
    out = ops.astype_like(probs[..., :shared], shared_v) @ shared_v
    p_selected = ops.astype_like(probs[..., shared:], selected_v)[:, :, :, None]
    out = out + (p_selected @ selected_v)[:, :, :, 0]
    return ops.astype_like(out, q)


class QuestKV(DecodeCache):
    """The full cache in pages of ``page`` tokens with each page's per-channel key min and max.

    Each step, per query head, attends to everything while it fits the ``budget``, else to the
    current page and the ``budget // page - 1`` other pages with the highest upper bound of q.k.
    The buffers grow by ``growth`` tokens when full.
    """

    held = ("keys", "values", "page_min", "page_max")
    buffers = held  # the page bounds are memory too

    def __init__(self, ops, policy, keys, values):
        self.ops, self.page, self.budget = ops, policy.page, policy.budget
        self.length = keys.shape[2]
        self.keys, self.values = self.grown(keys, self.growth), self.grown(values, self.growth)
        whole = self.length // self.page * self.page  # the full pages, reduced at once
        pages = keys[:, :, :whole].reshape(*keys.shape[:2], whole // self.page, self.page, keys.shape[3])
        bounds_min, bounds_max = [ops.reduce_min(pages, axis=3)], [ops.reduce_max(pages, axis=3)]
        if whole < self.length:  # the last page, partly filled
            bounds_min.append(ops.reduce_min(keys[:, :, whole:], axis=2)[:, :, None])
            bounds_max.append(ops.reduce_max(keys[:, :, whole:], axis=2)[:, :, None])
        self.page_min = self.grown(ops.concat(bounds_min, axis=2), self.page_growth)
        self.page_max = self.grown(ops.concat(bounds_max, axis=2), self.page_growth)

    @property
    def page_growth(self) -> int:
        """Pages added per reallocation of the bounds."""
        return -(-self.growth // self.page)

    def append(self, key, value):
        if key.shape[2] != 1:
            raise SageKVError("after prefill the Quest cache takes one token per step")
        t, ops = self.length, self.ops
        if t == self.keys.shape[2]:
            self.keys, self.values = self.grown(self.keys, self.growth), self.grown(self.values, self.growth)
        self.keys[:, :, t : t + 1] = key
        self.values[:, :, t : t + 1] = value
        p = t // self.page
        if p == self.page_min.shape[2]:
            self.page_min = self.grown(self.page_min, self.page_growth)
            self.page_max = self.grown(self.page_max, self.page_growth)
        if t % self.page == 0:
            self.page_min[:, :, p : p + 1], self.page_max[:, :, p : p + 1] = key, key
        else:
            self.page_min[:, :, p : p + 1] = ops.xp.minimum(self.page_min[:, :, p : p + 1], key)
            self.page_max[:, :, p : p + 1] = ops.xp.maximum(self.page_max[:, :, p : p + 1], key)
        self.length = t + 1

    def attend(self, queries, scale):
        ops, t = self.ops, self.length
        _, hq, _, d = queries.shape
        hkv = self.keys.shape[1]
        if t <= self.budget:
            return ops.attention(queries, self.keys[:, :, :t], self.values[:, :, :t], scale)
        pages = -(-t // self.page)
        q = ops.float32(queries.reshape(hkv, hq // hkv, 1, d))
        low, high = ops.float32(self.page_min[0, :, None, : pages - 1]), ops.float32(self.page_max[0, :, None, : pages - 1])
        bound = ops.xp.maximum(q * low, q * high).sum(axis=-1)  # [Hkv, G, pages-1]
        chosen = ops.topk_indices(bound, self.budget // self.page - 1)  # the current page is the budget's last
        current = ops.full((*chosen.shape[:2], 1), pages - 1, like=chosen)
        chosen = ops.concat([chosen, current], axis=-1)  # [Hkv, G, P]
        offsets = ops.arange(0, self.page, like=chosen)
        positions = (chosen[..., None] * self.page + offsets).reshape(hkv, hq // hkv, -1)
        beyond = ops.float32(positions >= t)[:, :, None]  # only the current page runs past the end
        positions = ops.xp.minimum(positions, ops.full(positions.shape, t - 1, like=positions))
        head = ops.arange(0, hkv, like=positions).reshape(hkv, 1, 1)
        k, v = self.keys[0][head, positions], self.values[0][head, positions]  # [Hkv, G, L, D]
        logits = ops.float32(ops.astype_like(q, k) @ k.swapaxes(-1, -2)) * scale - 1e30 * beyond
        probs = ops.astype_like(ops.softmax(logits), v)
        return ops.astype_like((probs @ v).reshape(1, hq, 1, d), queries)

    def kept_from(self, positions: list):
        return None  # every position stays; pages are chosen per step

    @property
    def meta(self) -> dict:
        return {**super().meta, "page": self.page, "budget": self.budget}

    @classmethod
    def from_state(cls, ops, arrays: dict, meta: dict):
        cache = super().from_state(ops, arrays, meta)
        cache.page, cache.budget = meta["page"], meta["budget"]
        return cache


class SegmentKV(DecodeCache):
    """One layer's keys/values [1, Hkv, T, D] for a compact sequence at given global positions.

    ``begin(rows, positions)`` announces the rows (compact indices, ascending) the next
    ``append`` writes: rows already held are overwritten, or fused as ``(1 - theta) * old +
    theta * new``; rows past the end are appended. ``attend`` then lets each written row see every
    row at or before its compact index. Without ``begin``, ``append`` adds one decoded token at
    the end (its position the next one), so the same object decodes after the method is done.
    """

    held = ("keys", "values")

    def __init__(self, ops, keys, values, positions):
        self.ops = ops
        self.size = keys.shape[2]
        self.keys, self.values = self.grown(keys, self.growth), self.grown(values, self.growth)
        self.positions = np.asarray(positions, dtype=np.int64)
        self.length = int(self.positions[-1]) + 1 if self.size else 0  # the next token's position
        self.rows = self.row_positions = self.theta = None
        self.track = False
        self.room = 0  # rows planned (see empty)
        self.deviation = None  # per written row that was held: squared change of its key
        self.queries = None  # the last written rows' queries [Hq, L, D]
        self.written = self.written_index = None  # the last written rows, on the host and on the device

    @classmethod
    def empty(cls, ops, like, room: int = 0):
        """A cache holding nothing yet, in ``like``'s dtype and device ([1, Hkv, 0, D]), that will
        hold ``room`` rows: written in several parts, they go in place into one buffer allocated at
        the first; written at once, they are adopted as they come."""
        segment = cls(ops, like, like, np.zeros(0, np.int64))
        segment.room = room
        return segment

    def begin(self, rows, positions, theta: Optional[float] = None, track: bool = False):
        self.rows, self.row_positions, self.theta, self.track = rows, positions, theta, track

    def append(self, key, value):
        ops, count = self.ops, key.shape[2]
        if self.rows is None:
            rows, positions = np.arange(self.size, self.size + count), np.arange(self.length, self.length + count)
        else:
            rows, positions = self.rows, self.row_positions
            self.rows = None
        if len(rows) != count:
            raise SageKVError(f"a pass announced {len(rows)} rows but the model wrote {count}")
        held = int(np.searchsorted(rows, self.size))  # rows[:held] exist, rows[held:] are appended
        if held < count and not np.array_equal(rows[held:], np.arange(self.size, self.size + count - held)):
            raise SageKVError("appended rows must follow the cache's end")
        needed = self.size + count - held
        if needed > self.keys.shape[2] and self.size == 0 and count >= self.room:
            # a first write of every row planned (one pass over the whole prompt): its arrays become
            # the buffers, with no copy and no second full-size buffer
            self.keys, self.values = key, value
            self.written, self.written_index, self.size = rows, None, count
            self.positions, self.length = np.asarray(positions, np.int64), int(positions[-1]) + 1
            return
        if needed > self.keys.shape[2]:  # one reallocation, to the planned room or past what arrives
            extra = max(needed, self.room, self.keys.shape[2] + self.growth) - self.keys.shape[2]
            self.keys, self.values = self.grown(self.keys, extra), self.grown(self.values, extra)
        index = ops.asarray(rows, like=self.keys)
        if held:
            old_k, old_v = self.keys[:, :, index[:held]], self.values[:, :, index[:held]]
            if self.track:
                change = ops.float32(key[:, :, :held]) - ops.float32(old_k)
                self.deviation = ops.to_numpy((change * change).sum(axis=-1).sum(axis=1)[0])
            if self.theta is not None:
                fuse = lambda old, new: ops.astype_like(old * (1 - self.theta) + new * self.theta, old)  # noqa: E731
                key = ops.concat([fuse(old_k, key[:, :, :held]), key[:, :, held:]], axis=2)
                value = ops.concat([fuse(old_v, value[:, :, :held]), value[:, :, held:]], axis=2)
        ops.write(self.keys, 2, index, key)
        ops.write(self.values, 2, index, value)
        self.written_index = index
        if held < count:
            self.positions = np.concatenate([self.positions, positions[held:]])
        self.size += count - held
        self.length = max(self.length, int(positions[-1]) + 1)
        self.written = rows

    def attend(self, queries, scale):
        """Attention of the rows just written [1, Hq, L, D] over every row at or before each."""
        rows, size = self.written, self.size
        self.queries = queries[0]
        if len(rows) == 1 and rows[0] == size - 1:
            mask = None  # one row at the end sees everything
        elif rows[0] == size - len(rows):
            # the last rows (ascending, so all of them): the causal mask aligned at the end, which keeps
            # attention on its fastest kernel with no [rows, size] mask, for every part of a prefill
            mask = "causal"
        else:
            index = self.written_index  # built on the device: a [rows, size] mask is too large to send
            mask = self.ops.arange(0, size, like=index)[None, :] <= index[:, None]
        return self.ops.attention(queries, self.keys[:, :, :size], self.values[:, :, :size], scale, mask)

    def decode_cache(self, policy, layer: int):
        """The cache to decode on: this one, or the policy's compact cache over its entries."""
        window = min(policy.observed_queries, self.size)  # a prompt shorter than the window: every query
        if window > self.queries.shape[1]:
            raise SageKVError(f"{policy.name} observes {window} queries; the question has {self.queries.shape[1]} tokens")
        compact = policy.decode_cache(self.ops, self.queries[:, -window:], self.keys[:, :, : self.size],
                                      self.values[:, :, : self.size], layer)
        if compact is None:
            return self
        compact.length = self.length  # positions continue from the concatenated prompt's
        return compact

    def kept_from(self, positions: list):
        if np.array_equal(self.positions, np.arange(self.length)):
            return None  # every position of the prompt: nothing evicted
        return self.positions[None]  # held on the host

    @property
    def arrays(self) -> list:
        return [self.keys[:, :, : self.size], self.values[:, :, : self.size]]

    @property
    def state(self) -> dict:
        return dict(zip(self.held, self.arrays))  # the rows held, not the room to grow

    @property
    def meta(self) -> dict:
        return {**super().meta, "positions": self.positions.tolist()}

    @classmethod
    def from_state(cls, ops, arrays: dict, meta: dict):
        return cls(ops, arrays["keys"], arrays["values"], np.asarray(meta["positions"], np.int64))


class BatchKV(DecodeCache):
    """One layer's caches of several sequences, stacked along the batch axis and decoded together.

    Each batch row holds its sequence's entries [Hkv, T, D] as one run of entries followed by a ring
    that each decoded token writes into, oldest entry first:

    * from a :class:`CompactKV`: its shared entries, the ring its own (R recent prompt tokens and the
      last one: full from the start, so every decoded token overwrites the oldest), and its per-head
      part, if any, in ``selected_k``/``selected_v`` [B, Hkv, G, k, D];
    * from a layer that keeps everything (:func:`full_layer`, or a :class:`SegmentKV`: N entries), the
      ring is ``room`` empty entries after them, where decoded tokens are appended, so nothing is ever
      overwritten.

    Rows are padded to the widest one, T; entries past a row's ring and those of its ring not yet
    written are masked out of attention, as is the per-head part of a row that has none, so padding
    never changes a result. Every row starts at the same step, so one step counter on the device
    serves all: each row's ring slot and mask follow from it, and a step is the same work every time
    (a CUDA graph of it replays). Positions are per row: ``lengths``.
    """

    held = ("keys", "values", "ring_start", "ring_size", "ring_fill", "step", "selected_k", "selected_v", "selected_rows")
    buffers = ("keys", "values", "selected_k", "selected_v")
    static = True

    def __init__(self, ops, layers: list, room: int):
        """``layers``: each sequence's layer, a CompactKV fresh from selection (nothing decoded on it yet), a
        SegmentKV or a full layer's arrays (:func:`full_layer`); ``room``: tokens each sequence may append."""
        self.ops = ops
        rows = [batch_row(layer, room) for layer in layers]
        width = max(row["end"] for row in rows)
        like = rows[0]["keys"]
        self.keys = ops.concat([self.padded(row["keys"], width) for row in rows], axis=0)
        self.values = ops.concat([self.padded(row["values"], width) for row in rows], axis=0)
        index = lambda values: ops.astype(ops.asarray(np.array(values), like=like), ops.index_dtype)  # noqa: E731
        self.ring_start = index([row["ring_start"] for row in rows])
        self.ring_size = index([row["ring_size"] for row in rows])
        self.ring_fill = index([row["ring_fill"] for row in rows])  # ring entries held at the start
        self.step = ops.full((1,), 0, like=self.ring_start)
        # no mask where every row is a full ring ending at the batch's width (equal compact caches)
        self.masked = any(row["ring_fill"] < row["ring_size"] or row["end"] < width for row in rows)
        selected = [row["selected"] for row in rows]
        known = [s for s in selected if s is not None]
        self.selected_k = self.selected_v = self.selected_rows = None
        if known:
            if any(s[0].shape != known[0][0].shape for s in known):
                raise SageKVError("the sequences' per-head selections differ in size: decode them with one policy")
            none = [ops.full(known[0][0].shape, 0.0, like=known[0][0])] * 2
            self.selected_k = ops.concat([(s or none)[0] for s in selected], axis=0)
            self.selected_v = ops.concat([(s or none)[1] for s in selected], axis=0)
            if len(known) < len(rows):
                self.selected_rows = index([s is not None for s in selected]).reshape(-1, 1, 1, 1) > 0
        starts = [row["length"] for row in rows]
        self.length = max(starts)  # the furthest row's next position; each row's is in ``lengths``
        self.behind = [self.length - start for start in starts]

    def padded(self, x, width: int):
        return x if x.shape[2] == width else self.grown(x, width - x.shape[2])

    @property
    def lengths(self) -> list:
        return [self.length - behind for behind in self.behind]

    def mask(self):
        """[B, 1, 1, T] True where a row's entry is attended to, or None when every entry is."""
        if not self.masked:
            return None
        held = self.ring_start + self.ops.xp.minimum(self.ring_fill + self.step, self.ring_size)  # [B]
        return (self.ops.arange(0, self.keys.shape[2], like=held)[None] < held[:, None])[:, None, None]

    def append(self, key, value):
        """Write each row's decoded token's key/value [B, Hkv, 1, D] into its ring's oldest slot."""
        if key.shape[2] != 1:
            raise SageKVError("a batch decodes one token per sequence per step")
        slots = (self.ring_fill + self.step) % self.ring_size + self.ring_start
        self.ops.write_rows(self.keys, slots, key)
        self.ops.write_rows(self.values, slots, value)
        self.step += 1
        self.length += 1

    def attend(self, queries, scale):
        ops = self.ops
        b, hq, length, d = queries.shape
        if length != 1:
            raise SageKVError("a batch decodes one token per sequence per step")
        mask = self.mask()
        if self.selected_k is None:
            return ops.attention(queries, self.keys, self.values, scale, mask)
        hkv = self.keys.shape[1]
        q = queries.reshape(b, hkv, hq // hkv, d) * scale
        out = two_part_attention(ops, q, self.keys, self.values, self.selected_k, self.selected_v, mask, self.selected_rows)
        return out.reshape(b, hq, 1, d)

    def kept_from(self, positions: list):
        raise SageKVError("a batch keeps no positions: each sequence's are read before its cache is stacked")

    @property
    def meta(self) -> dict:
        return {**super().meta, "behind": self.behind, "masked": self.masked}

    @classmethod
    def from_state(cls, ops, arrays: dict, meta: dict):
        cache = super().from_state(ops, arrays, meta)
        cache.behind, cache.masked = list(meta["behind"]), meta["masked"]
        return cache


def batch_row(layer, room: int) -> dict:
    """One sequence's layer as a :class:`BatchKV` row: its entries [1, Hkv, W, D], where its ring starts, its
    size and how much of it is held, where the row's entries end, its per-head part and next position."""
    if isinstance(layer, CompactKV):
        return {"keys": layer.shared_k, "values": layer.shared_v, "ring_start": layer.ring_start,
                "ring_size": layer.ring_size, "ring_fill": layer.ring_size, "end": layer.shared_k.shape[2],
                "selected": (layer.selected_k, layer.selected_v) if layer.per_head else None, "length": layer.length}
    if isinstance(layer, SegmentKV):  # what a layer-wise prefill keeps where the policy keeps everything
        keys, values = layer.arrays
        length = layer.length
    elif isinstance(layer, dict):
        keys, values = layer["keys"], layer["values"]
        length = keys.shape[2]
    else:
        raise SageKVError(f"{type(layer).__name__} caches cannot be decoded in a batch (only compact and full ones)")
    n, room = keys.shape[2], max(room, 1)  # a ring of one at least: slots are taken modulo its size
    return {"keys": keys, "values": values, "ring_start": n, "ring_size": room, "ring_fill": 0, "end": n + room,
            "selected": None, "length": length}
