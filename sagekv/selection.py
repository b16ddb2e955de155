"""Which positions a policy keeps after prefill: sink + top-k candidates + recent + last."""

from __future__ import annotations

from .errors import SageKVError
from .ops import ops_for


def select(policy, query, keys):
    """Kept absolute positions for one layer, sorted ascending.

    ``query``: the last prompt token's post-RoPE query, [Hq, D]; ``keys``: the layer's
    post-RoPE keys, [Hkv, N, D]. Returns [rows, S+k+R+1] (rows = Hq for per-query-head
    selection, Hkv otherwise), or [rows, N] when nothing is evicted; same array type as
    the inputs.
    """
    ops = ops_for(query)
    if len(query.shape) != 2 or len(keys.shape) != 3 or query.shape[-1] != keys.shape[-1]:
        raise SageKVError(
            f"expected query [Hq, D] and keys [Hkv, N, D], got {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    layout = policy.layout(keys.shape[1], query.shape[0], keys.shape[0])
    return kept_positions(policy, ops, query, keys, layout)


def kept_positions(policy, ops, query, keys, layout):
    n, rows = layout.n, layout.rows
    if not layout.evicts:
        return ops.broadcast_rows(ops.arange(0, n, like=keys), rows)
    parts = [ops.broadcast_rows(ops.arange(0, layout.sink, like=keys), rows)]
    if layout.topk:
        scores = policy.scores(ops, query, keys, layout)
        parts.append(ops.sort(ops.topk_indices(scores, layout.topk)) + layout.sink)
    parts.append(ops.broadcast_rows(ops.arange(n - 1 - layout.recent, n, like=keys), rows))
    return ops.concat(parts, axis=1)
