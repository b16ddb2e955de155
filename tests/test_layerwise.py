"""Layer-wise prefill (sagekv.layerwise): the same kept positions and tokens as the full-cache prefill,
each layer's full keys and values freed before the next layer runs."""

import gc
import weakref

import numpy as np
import pytest

import sagekv
from conftest import FAMILIES
from sagekv import layerwise
from sagekv.cache import CompactKV, SegmentKV
from sagekv.policies import make_policy

PROMPT = "Alpha beta gamma delta. The key for door seven is 4821. Epsilon zeta eta theta iota. " * 3
BUDGET = 32
POLICIES = [make_policy(name, BUDGET) for name in ("sagekv_kv_follow", "sagekv", "streaming", "tova", "knorm")] + [
    sagekv.SnapKV(BUDGET, window=16), sagekv.Random(BUDGET, seed=5)]


@pytest.fixture
def models(tiny_models):
    return tiny_models


def same_kept(a, b):
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def full_cache_generate(model, ids, policy, max_tokens=12):
    """Today's path: chunked prefill of the whole model, the full cache, then one selection."""
    return model.decode(model.prefill(ids, policy.observed_queries), policy, max_tokens, keep_prefill=False)


def counting_layers(monkeypatch, run):
    """Rows of each call of run.layer, per layer."""
    calls = {}
    layer = run.layer

    def counted(index, hidden, positions, cache):
        calls.setdefault(index, []).append(len(positions))
        return layer(index, hidden, positions, cache)

    monkeypatch.setattr(run, "layer", counted)
    return calls


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_keeps_what_the_full_cache_prefill_keeps(models, family, backend, monkeypatch):
    model = models(family, backend)
    ids = model.encode(PROMPT)
    calls = counting_layers(monkeypatch, model.runner)
    for policy in POLICIES:
        reference = full_cache_generate(model, ids, policy)
        assert reference.kept_positions is not None, policy  # the prompt is long enough to evict
        for chunk in (None, 7):
            calls.clear()
            result = model.generate_ids(ids, policy, 12, prefill_chunk=chunk)
            assert result.tokens == reference.tokens, (policy, chunk)
            assert same_kept(result.kept_positions, reference.kept_positions), (policy, chunk)
            assert (result.stats.full_kv_bytes, result.stats.kept_kv_bytes) == \
                (reference.stats.full_kv_bytes, reference.stats.kept_kv_bytes)
            rows = max(chunk or len(ids), policy.observed_queries)  # never fewer rows than the queries observed
            parts = [len(ids) % rows] * (len(ids) % rows > 0) + [rows] * (len(ids) // rows)  # cut from the end
            assert calls == {layer: parts for layer in range(model.runner.num_layers)}, (policy, chunk)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_the_observed_queries_are_the_prompts_last(models, backend, monkeypatch):
    """SnapKV scores with the prompt's last `window` queries, whatever the chunk; a prompt shorter than
    the window gives every query, as the full-cache prefill does."""
    model = models("llama", backend)
    seen = []
    decode_cache = sagekv.SnapKV.decode_cache

    def spy(self, ops, queries, keys, values, layer):
        seen.append((queries.shape[1], keys.shape[2], np.array(ops.to_numpy(queries))))
        return decode_cache(self, ops, queries, keys, values, layer)

    monkeypatch.setattr(sagekv.SnapKV, "decode_cache", spy)
    policy = sagekv.SnapKV(24, window=16)
    for ids in (model.encode(PROMPT), model.encode(PROMPT)[:10]):
        full_cache_generate(model, ids, policy, 1)
        reference, seen[:] = list(seen), []
        for chunk in (None, 5, 16, 17):
            model.generate_ids(ids, policy, 1, prefill_chunk=chunk)
            assert [s[:2] for s in seen] == [(min(16, len(ids)), len(ids))] * model.runner.num_layers
            for (_, _, got), (_, _, want) in zip(seen, reference):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            seen.clear()


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_each_layer_is_compacted_before_the_next_runs(models, backend, monkeypatch):
    model = models("llama", backend)
    run = model.runner
    ids = model.encode(PROMPT)
    segments = {}  # layer -> weak reference to the SegmentKV it ran on
    layer = run.layer

    def checked(index, hidden, positions, cache):
        gc.collect()
        decoders = run.unwrap(cache)
        for earlier in range(index):
            assert isinstance(decoders[earlier], CompactKV) and segments[earlier]() is None
        assert isinstance(decoders[index], SegmentKV)
        segments.setdefault(index, weakref.ref(decoders[index]))
        return layer(index, hidden, positions, cache)

    monkeypatch.setattr(run, "layer", checked)
    for chunk in (None, 9):
        segments.clear()
        result = model.generate_ids(ids, sagekv.SageKV(BUDGET), 2, prefill_chunk=chunk)
        assert sorted(segments) == list(range(run.num_layers)) and result.kept_positions is not None


def test_full_and_quest_keep_the_full_cache_prefill(models, monkeypatch):
    """They evict nothing: the prefill is today's (chunks through the whole model), not layer by layer."""
    model = models("llama", "torch")
    calls = counting_layers(monkeypatch, model.runner)
    ids = model.encode(PROMPT)
    for policy in (sagekv.Full(), sagekv.Quest(32, page=8, dense_layers=1)):
        assert model.generate_ids(ids, policy, 4).tokens == full_cache_generate(model, ids, policy, 4).tokens
    assert calls == {}
    model.generate_ids(ids, sagekv.SageKV(BUDGET), 1)
    assert calls


def test_a_layerwise_prefill_is_selected_and_decodes_again(models):
    """Its layers hold the policy's caches, as after select: decode takes no other policy, and with
    keep_prefill (the default) decodes a copy, so the same prefill decodes twice alike."""
    model = models("llama", "torch")
    ids = model.encode(PROMPT)
    policy = sagekv.SageKV(BUDGET)
    prefilled = model.prefill_layerwise(ids, policy)
    with pytest.raises(sagekv.SageKVError, match="selected by .* already"):
        model.decode(prefilled, sagekv.StreamingLLM(BUDGET), 2)
    expected = full_cache_generate(model, ids, policy, 4).tokens
    assert model.decode(prefilled, None, 4).tokens == expected
    assert model.decode(prefilled, None, 4, keep_prefill=False).tokens == expected


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_rows_per_layer_call_follow_the_free_memory(models, backend, monkeypatch):
    model = models("llama", backend)
    run = model.runner
    ids = model.encode(PROMPT)
    monkeypatch.setattr(run, "free_bytes", lambda: 1 << 40)
    assert layerwise.layer_rows(run, len(ids)) == len(ids)  # everything fits: one call per layer
    tight = 1 << 21
    monkeypatch.setattr(run, "free_bytes", lambda: tight)
    rows = layerwise.layer_rows(run, len(ids))
    assert 1 <= rows < len(ids)
    monkeypatch.setattr(run, "free_bytes", lambda: 2 * tight)
    assert rows < layerwise.layer_rows(run, len(ids)) <= len(ids)
    monkeypatch.setattr(run, "free_bytes", lambda: tight)
    calls = counting_layers(monkeypatch, run)
    policy = sagekv.SageKV(BUDGET)
    assert model.generate_ids(ids, policy, 8).tokens == full_cache_generate(model, ids, policy, 8).tokens
    assert max(calls[0]) == rows and sum(calls[0]) == len(ids)


@pytest.mark.parametrize("fused", [True, False])
def test_unfused_attention_takes_parts_of_mlx_lms_step(models, monkeypatch, fused):
    run = models("llama", "torch").runner
    monkeypatch.setattr(type(run), "fused_causal", fused)
    monkeypatch.setattr(run, "free_bytes", lambda: 1 << 50)
    length = 3 * layerwise.UNFUSED_ROWS
    assert layerwise.layer_rows(run, length) == (length if fused else layerwise.UNFUSED_ROWS)
    assert layerwise.layer_rows(run, 100) == 100


def test_spans_cut_from_the_end():
    assert layerwise.spans(10, None) == [(0, 10)]
    assert layerwise.spans(10, 10) == layerwise.spans(10, 12) == [(0, 10)]
    assert layerwise.spans(10, 4) == [(0, 2), (2, 6), (6, 10)]
    assert layerwise.spans(8, 4) == [(0, 4), (4, 8)]
