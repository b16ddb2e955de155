"""One matrix over every policy: selection against float64 references on numpy, MLX and torch
inputs, end-to-end MLX vs torch parity, full attention's tokens at a budget that holds the whole
prompt, and Quest's decode against a plain reference."""

import numpy as np
import pytest

import sagekv
from conftest import LIBRARIES, needs_mlx, needs_torch, to_library, to_numpy
from reference import assert_valid_selection, masked_attention, policy_reference, quest_pages
from sagekv.ops import ops_for
from sagekv.policies import NAMED, make_policy
from sagekv.tasks import generate
from sagekv.cache import QuestKV

# Each policy with an easy and a hard setting (kvpress' test matrix style).
POLICIES = [
    sagekv.SageKV(48),
    sagekv.SageKV(24, sink=2, topk=3, recent=5),
    sagekv.SageKV(48, group="kv_head"),
    sagekv.SageKV(48, pool=9),
    sagekv.SageKV(24, group="kv_head", pool=5),
    sagekv.SageKV(48, follow=8),
    sagekv.SageKV(24, group="kv_head", pool=3, follow=5, decay=0.7),
    sagekv.StreamingLLM(48),
    sagekv.StreamingLLM(10, sink=0),
    sagekv.SnapKV(48, window=8, kernel=7),
    sagekv.SnapKV(24, window=4, kernel=3, pooling="avg"),
    sagekv.TOVA(48),
    sagekv.TOVA(8),
    sagekv.Knorm(48),
    sagekv.Knorm(8),
    sagekv.Random(48, seed=1),
    sagekv.Random(8, seed=2),
    sagekv.Quest(64, page=8),
    sagekv.Full(),
]
IDS = [repr(p) for p in POLICIES]


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
@pytest.mark.parametrize("hq,hkv,n", [(8, 2, 200), (7, 1, 120), (4, 4, 40)])
def test_selection_matches_reference(library, policy, hq, hkv, n):
    rng = np.random.default_rng(hq * 100 + n)
    window = policy.observed_queries
    queries = rng.standard_normal((hq, window, 16)).astype(np.float32)
    keys = rng.standard_normal((hkv, n, 16)).astype(np.float32)
    kept = sagekv.select(policy, to_library(queries, library), to_library(keys, library))
    assert type(kept).__module__.split(".")[0] == library
    kept = to_numpy(kept)
    layout = policy.layout(n, hq, hkv)
    assert kept.shape == (layout.rows, layout.kept_per_row)
    if layout.evicts and not isinstance(policy, sagekv.SageKV):
        assert kept.shape[1] == policy.budget + 1  # equal memory: budget + the last token
    assert_valid_selection(kept, policy_reference(policy, queries, keys))


@needs_mlx
@needs_torch
@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_mlx_and_torch_agree_end_to_end(tiny_models, policy):
    # Varied text: repeated tokens give equal key norms at layer 0, which backends tie-break differently.
    prompt = generate("single_needle", 400, seed=0).prompt
    x = tiny_models("llama", "mlx").generate(prompt, policy=policy, max_tokens=12)
    y = tiny_models("llama", "torch").generate(prompt, policy=policy, max_tokens=12)
    assert x.tokens == y.tokens
    assert (x.kept_positions is None) == (y.kept_positions is None)
    if x.kept_positions is not None:
        assert all(np.array_equal(a, b) for a, b in zip(x.kept_positions, y.kept_positions))
    assert x.stats.kept_kv_bytes == y.stats.kept_kv_bytes


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("name", [name for name in NAMED if name != "full"])
def test_budget_holding_the_prompt_gives_full_attention(tiny_models, backend, name):
    """At the smallest budget that holds everything, and at a larger one, every named policy decodes
    full attention's tokens. A policy that selects once after prefill holds everything from n - 1
    (it keeps budget + the last prompt token); Quest's budget caps what one step reads of a context
    that grows while decoding, so it needs n + tokens - 1, the context of the last step."""
    tokens = 12
    model = tiny_models("llama", backend)
    ids = model.encode(generate("single_needle", 400, seed=0).prompt)
    n = len(ids)
    tightest = n + tokens - 1 if name == "quest" else n - 1
    prefilled = model.prefill(ids, make_policy(name, tightest).observed_queries)
    full = model.decode(prefilled, sagekv.Full(), tokens).tokens
    for budget in (tightest, 2 * n):
        result = model.decode(prefilled, make_policy(name, budget), tokens)
        assert result.tokens == full, budget
        assert result.kept_positions is None, budget


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("page,budget,hq,hkv", [(8, 32, 8, 2), (4, 8, 7, 1), (16, 32, 4, 4), (16, 100, 4, 4)])
def test_quest_decode_matches_reference(library, page, budget, hq, hkv):
    rng = np.random.default_rng(page + budget)
    d, n, steps = 8, 70, 300  # crosses a reallocation of the page store
    keys = rng.standard_normal((1, hkv, n + steps, d))
    values = rng.standard_normal((1, hkv, n + steps, d))
    queries = rng.standard_normal((steps, hq, d))
    as_lib = lambda x: to_library(x.astype(np.float32), library)  # noqa: E731
    cache = QuestKV(ops_for(as_lib(keys)), sagekv.Quest(budget, page=page), as_lib(keys[:, :, :n]), as_lib(values[:, :, :n]))
    g, scale = hq // hkv, d**-0.5
    for t in range(steps):
        length = n + t + 1
        cache.append(as_lib(keys[:, :, length - 1 : length]), as_lib(values[:, :, length - 1 : length]))
        out = to_numpy(cache.attend(as_lib(queries[t][None, :, None]), scale))[0, :, 0]
        for h in range(hq):
            k, v = keys[0, h // g].astype(np.float32).astype(np.float64), values[0, h // g]
            positions = quest_pages(queries[t, h], k[:length], length, page, budget)
            expected = masked_attention(queries[t, h], keys[0, h // g], v, positions, scale)
            np.testing.assert_allclose(out[h], expected, rtol=3e-5, atol=3e-5)
    held = cache.nbytes
    assert held >= 2 * hkv * (n + steps) * d * 4  # the full cache is kept, plus page metadata


def test_quest_reports_full_memory(tiny_models):
    model = tiny_models("llama", "torch")
    prompt = "x" * 300
    quest = model.generate(prompt, policy=sagekv.Quest(64, page=16, dense_layers=1), max_tokens=4)
    full = model.generate(prompt, policy=sagekv.Full(), max_tokens=4)
    assert quest.kept_positions is None
    assert quest.stats.kept_kv_bytes > full.stats.kept_kv_bytes


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: sagekv.SnapKV(16, window=32), "at least the window"),
        (lambda: sagekv.SnapKV(64, kernel=4), "kernel must be odd"),
        (lambda: sagekv.SnapKV(64, pooling="min"), "pooling must be"),
        (lambda: sagekv.Quest(16, page=16), "at least two pages"),
        (lambda: sagekv.Quest(64, dense_layers=-1), "dense_layers must be >= 0"),
        (lambda: sagekv.SageKV(64, pool=4), "pool must be odd"),
        (lambda: sagekv.SageKV(64, follow=0), "follow must be >= 1"),
        (lambda: sagekv.SageKV(64, follow=4, decay=1.5), "decay must be a number in"),
        (lambda: sagekv.Random(64, seed=-1), "seed must be >= 0"),
        (lambda: sagekv.TOVA(0), "budget must be >= 1"),
        (lambda: sagekv.Knorm("a"), "budget must be an integer"),
        (lambda: sagekv.make_policy("h2o", 64), "unknown policy"),
        (lambda: sagekv.make_policy("snapkv"), "--budget is required"),
    ],
)
def test_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_decode_refuses_a_prefill_that_observed_too_few_queries(tiny_models, backend):
    """SnapKV scores with its last ``window`` prompt queries: a prefill that kept fewer is refused,
    unless the prompt is no longer than what it kept."""
    model = tiny_models("llama", backend)
    policy = sagekv.SnapKV(48, window=8)
    ids = model.encode(generate("single_needle", 400, seed=0).prompt)
    with pytest.raises(sagekv.SageKVError, match="snapkv needs the last 8 prompt queries but the prefill observed 4"):
        model.decode(model.prefill(ids, 4), policy, 2)
    assert model.decode(model.prefill(ids, 8), policy, 2).tokens
    assert model.decode(model.prefill(ids[:3], 3), policy, 2).tokens  # the whole prompt observed


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_unrouted_attention_is_a_sagekv_error(tiny_models, backend):
    runner = tiny_models("llama", backend).runner
    with pytest.raises(sagekv.SageKVError, match="was not routed through sagekv"):
        runner.compress(runner.new_cache(), sagekv.SnapKV(48, window=8))
