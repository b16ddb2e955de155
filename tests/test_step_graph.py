"""A decode step captured once and replayed (backends/torch.py StepGraph), on the CPU.

CUDA graphs need a GPU (tests/test_gpu.py runs the real ones); here make_fx stands in for the capture: it
traces the step into a graph of its tensor operations on the cache's own tensors, and a replay of that
graph, as of a CUDA graph, runs none of the step's Python. So everything StepGraph adds (warm-up, capture,
the token copied into the captured input, the host-side counts advanced after a replay) is checked against
eager decode, step by step, with the cache's whole state compared.
"""

import numpy as np
import pytest

import sagekv
from sagekv.policies import make_policy

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

PROMPT = "Alpha beta gamma delta. The key for door seven is 4821. Epsilon zeta eta theta iota. " * 3
BUDGET = 32
STATIC = ["sagekv_kv_follow", "sagekv", "snapkv", "streaming", "tova", "knorm", "random"]


class Traced:
    """CudaGraphs' stand-in: warm runs the step, record traces it (running it once, as record must)."""

    @staticmethod
    def warm(step):
        return step()

    @staticmethod
    def record(step):
        logits = []
        graph = make_fx(lambda: logits.append(step()) or logits[0])()
        return lambda: logits[0].copy_(graph()), logits[0]


def state(cache) -> dict:
    """Every attribute of the cache, its layers and their decoders (tensors as numpy), but the graph."""
    owners = [("cache", cache)] + [(f"layer {i}", layer) for i, layer in enumerate(cache.layers)]
    owners += [(f"decoder {i}", layer.decoder) for i, layer in enumerate(cache.layers) if layer.decoder is not None]
    held = {}
    for owner, obj in owners:
        for name, value in vars(obj).items():
            if name not in ("graph", "layers", "decoder"):
                held[owner, name] = value.numpy().copy() if isinstance(value, torch.Tensor) else value
    return held


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert np.array_equal(value, b[key]) if isinstance(value, np.ndarray) else value == b[key], key


def step(run, graphs, token, cache):
    run.graphs = graphs
    try:
        return run.forward(token, cache)
    finally:
        run.graphs = None


@pytest.mark.parametrize("name", STATIC)
def test_replayed_steps_match_eager_step_by_step(tiny_models, name):
    """Past two turns of the ring, then an eager step after the replays (it reads the host-side counts)."""
    model = tiny_models("llama", "torch")
    run = model.runner
    policy = make_policy(name, BUDGET)
    prefilled = model.prefill(model.encode(PROMPT), policy.observed_queries)
    eager, captured = (model.select(prefilled, policy).cache for _ in range(2))
    assert captured.static
    token = run.next_token(prefilled.logits)
    ring = captured.layers[0].decoder.ring_size
    for index in range(2 * ring + 3):
        expected = step(run, None, token, eager)
        got = step(run, Traced, token, captured)
        assert torch.equal(got, expected), index
        assert_same_state(state(captured), state(eager))
        token = run.next_token(expected)
    assert captured.graph.replay is not None and eager.graph is None
    assert torch.equal(step(run, None, token, captured), step(run, None, token, eager))
    assert_same_state(state(captured), state(eager))


def test_decode_with_replayed_steps_gives_eager_tokens(tiny_models):
    model = tiny_models("llama", "torch")
    run = model.runner
    prefilled = model.prefill(model.encode(PROMPT))
    policy = sagekv.SageKV(BUDGET, group="kv_head")
    expected, seen = [], []
    eager = model.decode(prefilled, policy, 40, on_token=lambda t: expected.append(list(t)))
    run.graphs = Traced
    try:
        captured = model.decode(prefilled, policy, 40, on_token=lambda t: seen.append(list(t)))
    finally:
        run.graphs = None
    assert captured.tokens == eager.tokens and len(eager.tokens) == 40
    assert seen == expected == [eager.tokens[: i + 1] for i in range(40)]


@pytest.mark.parametrize("policy", [sagekv.Full(), sagekv.Quest(32, page=8, dense_layers=0)], ids=repr)
def test_caches_that_grow_decode_eagerly(tiny_models, policy):
    model = tiny_models("llama", "torch")
    run = model.runner
    prefilled = model.prefill(model.encode(PROMPT))
    eager, captured = (model.select(prefilled, policy).cache for _ in range(2))
    assert not captured.static
    token = run.next_token(prefilled.logits)
    for _ in range(12):
        expected = step(run, None, token, eager)
        assert torch.equal(step(run, Traced, token, captured), expected)
        token = run.next_token(expected)
    assert captured.graph is None


@pytest.mark.parametrize("name", ["sagekv", "sagekv_kv_follow", "full"])
def test_replayed_batch_steps_match_eager_step_by_step(tiny_models, name):
    """A batch's cache (cache.BatchKV) is static, full attention's too: a short prompt that keeps everything
    (its rows padded and masked) beside a long one, past two turns of the ring."""
    model = tiny_models("llama", "torch")
    run = model.runner
    policy = make_policy(name, BUDGET)

    def batch():
        prefilled = [model.prefill(model.encode(prompt), policy.observed_queries) for prompt in ("Door seven.", PROMPT)]
        return model.stack([model.select(p, policy, keep_prefill=False).cache for p in prefilled], 40), prefilled

    (eager, prefilled), (captured, _) = batch(), batch()
    assert captured.static
    token = run.next_tokens(torch.stack([p.logits for p in prefilled]))
    for index in range(40):
        expected = step(run, None, token, eager)
        got = step(run, Traced, token, captured)
        assert expected.shape[0] == 2 and torch.equal(got, expected), index
        assert_same_state(state(captured), state(eager))
        token = run.next_tokens(expected)
    assert captured.graph.replay is not None and eager.graph is None
    assert torch.equal(step(run, None, token, captured), step(run, None, token, eager))
