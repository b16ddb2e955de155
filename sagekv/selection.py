"""Which positions a policy keeps after prefill: sink + top-k candidates + recent + last."""

from __future__ import annotations

from .errors import SageKVError
from .ops import ops_for


def select(policy, query, keys):
    """Kept absolute positions for one layer, sorted ascending.

    ``query``: the last prompt token's post-RoPE query, [Hq, D] (or the last W prompt
    queries, [Hq, W, D], for policies that observe a window); ``keys``: the layer's post-RoPE
    keys, [Hkv, N, D]. Returns [rows, S+k+R+1] (rows = Hq for per-query-head selection, Hkv
    otherwise), or [rows, N] when nothing is evicted; same array type as the inputs.
    """
    ops = ops_for(query)
    if len(query.shape) == 2:
        query = query[:, None]
    if len(query.shape) != 3 or len(keys.shape) != 3 or query.shape[-1] != keys.shape[-1]:
        raise SageKVError(
            f"expected query [Hq, D] and keys [Hkv, N, D], got {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    layout = policy.layout(keys.shape[1], query.shape[0], keys.shape[0])
    return kept_positions(policy, ops, query, keys, layout)


def kept_positions(policy, ops, queries, keys, layout):
    n, rows = layout.n, layout.rows
    if not layout.evicts:
        return ops.broadcast_rows(ops.arange(0, n, like=keys), rows)
    parts = [ops.broadcast_rows(ops.arange(0, layout.sink, like=keys), rows)]
    if layout.topk:
        scores = policy.scores(ops, queries, keys, layout)
        parts.append(top_positions(ops, scores, layout.topk) + layout.sink)
    parts.append(ops.broadcast_rows(ops.arange(n - 1 - layout.recent, n, like=keys), rows))
    return ops.concat(parts, axis=1)


def top_positions(ops, scores, k: int):
    """Indices of the k largest scores per row, ascending; equal scores keep the earliest position.

    The tie rule makes every backend keep the same tokens when scores tie exactly (max-pooled
    plateaus, keys of repeated tokens). Two top-k passes over the row and sorts of 2k entries, no
    running sum over the row (which on a GPU costs more than the rest of the selection).
    """
    rows, count = scores.shape
    some = ops.topk_indices(scores, k)  # every score above the k-th, and some equal to it
    row = ops.arange(0, rows, like=some)[:, None]
    picked = scores[row, some]
    kth = ops.reduce_min(picked, axis=-1)[:, None]
    above = picked > kth
    missing = k - above.sum(axis=-1)[:, None]  # how many of the scores equal to the k-th are kept
    tied = scores == kth
    earliest = ops.topk_indices(ops.xp.where(tied, -ops.arange(0, count, like=some)[None], -count), k)  # any order
    earliest = ops.sort(ops.xp.where(tied[row, earliest], earliest, count))  # tied positions first, ascending
    chosen = ops.xp.where(ops.arange(0, k, like=some)[None] < missing, earliest, count)
    return ops.sort(ops.concat([ops.xp.where(above, some, count), chosen], axis=1))[:, :k]


def last_queries(ops, previous, queries, window: int):
    """The last ``window`` prompt queries [Hq, W, D] seen so far, after a chunk [1, Hq, L, D]."""
    latest = queries[0, :, -window:]
    if previous is None or latest.shape[1] >= window:
        return latest
    return ops.concat([previous, latest], axis=1)[:, -window:]
