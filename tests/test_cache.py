"""Decoding over the compact cache equals full attention masked to the kept positions; every
decode cache comes back identical from its state; the compact cache's indices stay on the device."""

import json

import numpy as np
import pytest

import sagekv
from conftest import LIBRARIES, to_library, to_numpy
from reference import masked_attention
from sagekv.cache import CompactKV, QuestKV, SegmentKV, cache_from_state
from sagekv.ops import ops_for


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize(
    "policy,hq,hkv",
    [
        (sagekv.SageKV(24), 8, 2),
        (sagekv.SageKV(24, group="kv_head"), 8, 2),
        (sagekv.SageKV(28, sink=2, topk=3, recent=5), 7, 1),
        (sagekv.SageKV(8, sink=0, topk=2, recent=0), 4, 4),  # a ring of one: only the newest token
        (sagekv.StreamingLLM(12, sink=4), 4, 2),
    ],
)
def test_decode_equals_masked_full_attention(library, policy, hq, hkv):
    rng = np.random.default_rng(hq + hkv)
    d, n, steps = 8, 90, 60  # many times the ring size, so the ring rolls over repeatedly
    keys = rng.standard_normal((1, hkv, n + steps, d))
    values = rng.standard_normal((1, hkv, n + steps, d))
    queries = rng.standard_normal((steps + 1, hq, d))
    as_lib = lambda x: to_library(x.astype(np.float32), library)  # noqa: E731

    cache = CompactKV.from_prefill(
        policy, ops_for(as_lib(queries[0])), as_lib(queries[0][:, None]), as_lib(keys[:, :, :n]), as_lib(values[:, :, :n])
    )
    kept = cache.kept()
    layout = cache.layout
    g = hq // hkv
    row_of_head = (lambda h: h) if layout.groups_per_kv == g else (lambda h: h // g)
    selected = {row: set(kept[row]) - set(range(layout.sink)) - set(range(n - 1 - layout.recent, n)) for row in range(layout.rows)}
    assert cache.nbytes == 2 * hkv * layout.kept_per_kv_head * d * 4

    scale = d**-0.5
    for t in range(steps):
        pos = n + t
        cache.append(as_lib(keys[:, :, pos : pos + 1]), as_lib(values[:, :, pos : pos + 1]))
        out = to_numpy(cache.attend(as_lib(queries[t + 1][None, :, None]), scale))[0, :, 0]
        recent = range(max(pos - layout.recent, 0), pos + 1)
        for h in range(hq):
            row = row_of_head(h)
            positions = sorted(set(range(layout.sink)) | selected[row] | set(recent))
            assert len(positions) == layout.kept_per_row
            expected = masked_attention(queries[t + 1, h], keys[0, h // g], values[0, h // g], positions, scale)
            np.testing.assert_allclose(out[h], expected, rtol=2e-5, atol=2e-5)
            assert list(cache.kept()[row]) == positions


def test_one_token_per_step_after_eviction():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, 2, 50, 4))
    cache = CompactKV.from_prefill(sagekv.SageKV(8), ops_for(keys), rng.standard_normal((4, 1, 4)), keys, keys)
    with pytest.raises(ValueError, match="one token per step"):
        cache.append(keys[:, :, :2], keys[:, :, :2])


def test_nothing_to_evict_returns_none():
    keys = np.zeros((1, 2, 20, 4))
    assert CompactKV.from_prefill(sagekv.SageKV(19), ops_for(keys), np.zeros((4, 1, 4)), keys, keys) is None


@pytest.mark.parametrize("library,dtype", [("torch", "bfloat16"), ("torch", "float16"), ("mlx", "bfloat16"), ("numpy", "float16")])
@pytest.mark.parametrize("policy", [sagekv.SageKV(24), sagekv.SageKV(24, group="kv_head")], ids=["query_head", "kv_head"])
def test_half_precision_decode_is_close(library, dtype, policy):
    """Production dtypes: scores and softmax run in float32, the output comes back in the cache dtype."""
    rng = np.random.default_rng(5)
    hq, hkv, d, n = 8, 2, 16, 80
    keys, values = rng.standard_normal((1, hkv, n + 1, d)), rng.standard_normal((1, hkv, n + 1, d))
    queries = rng.standard_normal((2, hq, d))

    def cast(x):
        x = to_library(x.astype(np.float32), library)
        if library == "torch":
            import torch

            return x.to(getattr(torch, dtype))
        if library == "mlx":
            import mlx.core as mx

            return x.astype(getattr(mx, dtype))
        return x.astype(dtype)

    cache = CompactKV.from_prefill(policy, ops_for(cast(keys)), cast(queries[0][:, None]), cast(keys[:, :, :n]), cast(values[:, :, :n]))
    cache.append(cast(keys[:, :, n:]), cast(values[:, :, n:]))
    out = cache.attend(cast(queries[1][None, :, None]), d**-0.5)
    assert str(out.dtype).endswith(dtype)
    out = to_numpy(out)[0, :, 0]
    kept = cache.kept()
    g = hq // hkv
    for h in range(hq):
        row = h if cache.layout.groups_per_kv == g else h // g
        expected = masked_attention(queries[1, h], keys[0, h // g], values[0, h // g], list(kept[row]), d**-0.5)
        np.testing.assert_allclose(out[h], expected, rtol=3e-2, atol=3e-2)


DECODE_CACHES = {
    "compact_query_head": lambda ops, q, k, v: CompactKV.from_prefill(sagekv.SageKV(24), ops, q, k, v),
    "compact_kv_head": lambda ops, q, k, v: CompactKV.from_prefill(sagekv.SageKV(24, group="kv_head"), ops, q, k, v),
    "quest": lambda ops, q, k, v: QuestKV(ops, sagekv.Quest(16, page=4), k, v),
    # a RAG cache with gaps in its positions (every third token evicted)
    "segment": lambda ops, q, k, v: SegmentKV(ops, k, v, np.arange(k.shape[2]) * 3 // 2),
}


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("kind", DECODE_CACHES)
def test_rebuilt_from_state_decodes_identically(library, kind):
    """Saved as a saved cache would be (arrays through numpy, meta through JSON), rebuilt after some
    steps, then both decode on: the same outputs and kept positions, across ring roll-overs and,
    for Quest, a reallocation of its store (the prompt plus 256 tokens)."""
    rng = np.random.default_rng(7)
    hq, hkv, d, n, steps, saved_at = 8, 2, 8, 70, 300, 150
    keys = rng.standard_normal((1, hkv, n + steps, d))
    values = rng.standard_normal((1, hkv, n + steps, d))
    queries = rng.standard_normal((steps, hq, d))
    as_lib = lambda x: to_library(x.astype(np.float32), library)  # noqa: E731
    ops = ops_for(as_lib(keys))
    cache = DECODE_CACHES[kind](ops, as_lib(queries[0][:, None]), as_lib(keys[:, :, :n]), as_lib(values[:, :, :n]))
    step = lambda c, t: c.append(as_lib(keys[:, :, n + t : n + t + 1]), as_lib(values[:, :, n + t : n + t + 1]))  # noqa: E731
    for t in range(saved_at):
        step(cache, t)

    arrays = {name: to_library(np.array(to_numpy(array)), library) for name, array in cache.state.items()}
    twin = cache_from_state(ops, arrays, json.loads(json.dumps(cache.meta)))
    assert type(twin) is type(cache) and twin.meta == cache.meta
    assert (twin.length, twin.nbytes) == (cache.length, cache.nbytes)

    for t in range(saved_at, steps):
        step(cache, t)
        step(twin, t)
        query = as_lib(queries[t][None, :, None])
        np.testing.assert_array_equal(to_numpy(twin.attend(query, d**-0.5)), to_numpy(cache.attend(query, d**-0.5)))
        kept, twin_kept = cache.kept(), twin.kept()
        assert (kept is None and twin_kept is None) or np.array_equal(kept, twin_kept)


def test_unknown_cache_kind():
    with pytest.raises(ValueError, match="unknown decode cache kind 'SamKV'"):
        cache_from_state(ops_for(np.zeros(1)), {}, {"kind": "SamKV"})


@pytest.mark.parametrize("library", ["mlx", "torch"])
@pytest.mark.parametrize("policy", [sagekv.SageKV(24), sagekv.SageKV(24, group="kv_head")], ids=["query_head", "kv_head"])
def test_ring_slot_and_positions_are_library_arrays(library, policy):
    """What append indexes with lives on the device, so a decode step reads no per-step host value."""
    rng = np.random.default_rng(3)
    keys = to_library(rng.standard_normal((1, 2, 81, 8)).astype(np.float32), library)
    queries = to_library(rng.standard_normal((8, 1, 8)).astype(np.float32), library)
    cache = CompactKV.from_prefill(policy, ops_for(keys), queries, keys[:, :, :80], keys[:, :, :80])
    cache.append(keys[:, :, 80:], keys[:, :, 80:])
    state = cache.state
    assert {"step", "shared_positions"} <= set(state)
    assert all(type(array).__module__.split(".")[0] == library for array in state.values())
    assert int(to_numpy(cache.step)[0]) == 1 and cache.length == 81


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("rows,size", [(5, 5), (3, 9), (1, 4)])
def test_causal_mask_is_aligned_at_the_end(library, rows, size):
    """Ops.attention's "causal": the queries are the last rows of the keys, query i seeing keys up to
    size - rows + i (a prefill part after the first), against one query head at a time in float64."""
    rng = np.random.default_rng(size)
    hq, hkv, d = 4, 2, 8
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((1, hq, rows, d), (1, hkv, size, d), (1, hkv, size, d)))
    x = to_library(q, library)
    got = to_numpy(ops_for(x).attention(x, to_library(k, library), to_library(v, library), d**-0.5, "causal"))
    for head in range(hq):
        for i in range(rows):
            kept = np.arange(size - rows + i + 1)
            expected = masked_attention(q[0, head, i].astype(np.float64), k[0, head // 2].astype(np.float64),
                                        v[0, head // 2].astype(np.float64), kept, d**-0.5)
            np.testing.assert_allclose(got[0, head, i], expected, rtol=1e-4, atol=1e-5)
