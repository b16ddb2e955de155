"""Decoding over the compact cache equals full attention masked to the kept positions."""

import numpy as np
import pytest

import sagekv
from conftest import LIBRARIES, to_library, to_numpy
from reference import masked_attention
from sagekv.cache import CompactKV
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
