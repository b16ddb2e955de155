"""Passes that run rows through the model one layer at a time, and the layer-wise prefill built on them.

A pass (:func:`run_pass`) embeds its tokens, then runs all of them through layer 0, then layer 1,
..., each layer's :class:`~sagekv.cache.SegmentKV` holding that layer's keys and values; it serves
the RAG methods (:mod:`sagekv.rag`) and the layer-wise prefill (:func:`prefill`).

The layer-wise prefill runs the prompt this way and, as soon as a layer has computed every row (its
last queries exist), replaces that layer's keys and values by the policy's decode cache, before the
next layer starts. The full cache never exists: the peak is the weights, the prompt's hidden
states, one layer's full keys and values with that layer's activations, and the compact caches.
A layer runs the whole prompt in one call when its activations fit (attention then takes the plain
causal mask, the fastest kernel of each backend), else parts of it (:func:`layer_rows`).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .cache import SegmentKV

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
HEADROOM = 0.5  # share of the free memory a prefill plans to fill: the rest absorbs allocator slack and kernels' workspace
UNFUSED_ROWS = 2048  # rows per layer call where attention materialises its scores (mlx-lm's prefill_step_size)


def run_pass(run, cache, segments, ids: list, positions, rows, schedule=None, theta=None, track=(), chunk=None,
             finish=None):
    """Compute ``rows`` (compact indices, ascending; tokens ``ids`` at global ``positions``) layer
    by layer and return the last row's logits. ``schedule(layer, rows, segments)`` may narrow the
    rows a layer computes to a subset of the previous layer's; ``track``: layers whose key change
    is recorded (``segments[layer].deviation``). ``chunk``: rows per call of a layer (default all:
    a pass writing every row of empty caches then attends with the plain causal mask); parts are cut
    from the end, so the last one holds the last ``chunk`` rows and their queries (``segment.queries``).
    ``finish(layer, segment)``: called when a layer has computed every row, before the next starts."""
    positions, rows = np.asarray(positions, np.int64), np.asarray(rows, np.int64)
    hidden = run.embed(ids)
    for layer, segment in enumerate(segments):
        keep = rows if schedule is None else schedule(layer, rows, segments)
        if len(keep) != len(rows):
            at = np.searchsorted(rows, keep)
            hidden, positions, rows = hidden[:, run.ops.asarray(at, like=hidden)], positions[at], keep
        parts = []
        for first, stop in spans(len(rows), chunk):
            segment.begin(rows[first:stop], positions[first:stop], theta, layer in track)
            part = hidden if stop - first == len(rows) else hidden[:, first:stop]
            parts.append(run.layer(layer, part, positions[first:stop], cache))
            run.evaluate([parts[-1], segment.keys, segment.values])  # MLX: one part's graph at a time
        hidden = parts[0] if len(parts) == 1 else run.ops.concat(parts, axis=1)
        del parts  # concatenated: the parts are freed before ``finish``
        if finish is not None:
            finish(layer, segment)
    return run.head(hidden[:, -1:], cache)


def spans(count: int, chunk: Optional[int]) -> list:
    """[first, stop) parts of ``count`` rows of ``chunk`` rows at most, cut from the end (the last is full)."""
    if not chunk or chunk >= count:
        return [(0, count)]
    edges = [0, *range(count % chunk or chunk, count, chunk), count]
    return list(zip(edges[:-1], edges[1:]))


def prefill(run, ids: list, policy, chunk: Optional[int] = None):
    """Layer-wise prefill of ``ids`` (positions 0..) evicting with ``policy``: each layer's decode
    cache is built as soon as the layer is computed and its full keys and values are freed.
    ``chunk``: rows per call of a layer (default :func:`layer_rows`; never fewer than the queries the
    policy observes). Returns the cache of decode caches, the last token's logits and the bytes the
    full cache would have held."""
    n = len(ids)
    window = min(policy.observed_queries, n)
    chunk = max(chunk or layer_rows(run, n), window)
    segments = [SegmentKV.empty(run.ops, run.empty_kv(), room=n) for _ in range(run.num_layers)]
    cache = run.wrap(segments)
    full_bytes = 0

    def finish(layer, segment):
        nonlocal full_bytes
        full_bytes += segment.nbytes
        decoder = segment.decode_cache(policy, layer)
        run.set_decoder(cache, layer, decoder)  # the cache lets go of the full keys and values
        run.evaluate(decoder.arrays)  # MLX: the compact cache is computed while the full one is still held
        segments[layer] = None

    with run.inference():
        rows = np.arange(n)
        logits = run_pass(run, cache, segments, ids, rows, rows, chunk=chunk, finish=finish)
    return cache, logits, full_bytes


def layer_rows(run, length: int) -> int:
    """Rows per call of a layer in a layer-wise prefill of ``length`` tokens, from the model's shape and
    the free memory: every row (one call, the causal kernel) when that call's activations fit in
    HEADROOM of the free memory beside the prompt's hidden states and one layer's keys and values;
    else as many as fit beside, to be safe, the scores a part's attention would take if its kernel
    materialised them (a part is the last rows so far: the causal mask aligned at the end, no mask
    array). Where attention materialises its scores (MLX on the CPU) at most UNFUSED_ROWS: one
    [heads, length, length] call is slower than parts of it, as mlx-lm's own prefill steps are."""
    config, item = run.config, ITEMSIZE[run.dtype]
    hidden, heads, inner = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
    q_dim, kv_dim = heads * run.head_dim, run.kv_heads * run.head_dim
    # per row: hidden in, normed, residual, out; queries and attention output; keys, values; the MLP's gate, up, product
    per_row = item * (4 * hidden + 2 * q_dim + 2 * kv_dim + 3 * inner)
    held = length * item * (2 * hidden + 2 * kv_dim)  # hidden states in and out, one layer's full keys and values
    budget = HEADROOM * run.free_bytes() - held
    scores = 0 if run.fused_causal else 4 * heads * length  # a kernel that materialises the float32 scores
    cap = length if run.fused_causal else min(length, UNFUSED_ROWS)
    if cap == length and length * (per_row + scores) <= budget:
        return length
    return max(min(int(budget // (per_row + 4 * heads * length)), cap), 1)


def host_available_bytes() -> int:
    """Memory the host can give without swapping: MemAvailable on Linux, else half the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
