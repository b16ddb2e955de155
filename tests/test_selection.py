import numpy as np
import pytest

import sagekv
from conftest import LIBRARIES, to_library, to_numpy
from reference import assert_valid_selection, policy_reference

# (Hq, Hkv, D, N, budget): group sizes 1, 2, 4, 7, 8; budgets that evict and that keep all
SHAPES = [
    (4, 4, 8, 100, 16),
    (8, 2, 16, 300, 64),
    (8, 2, 16, 65, 64),  # N = budget + 1: nothing evicted
    (7, 1, 8, 257, 56),
    (14, 2, 32, 500, 112),
    (28, 4, 16, 1000, 256),
    (8, 1, 8, 40, 100),  # budget > N
]


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("group", ["query_head", "kv_head"])
@pytest.mark.parametrize("hq,hkv,d,n,budget", SHAPES)
def test_select_matches_float64_reference(library, group, hq, hkv, d, n, budget):
    rng = np.random.default_rng(hq * 1000 + n)
    query = rng.standard_normal((hq, d)).astype(np.float32)
    keys = rng.standard_normal((hkv, n, d)).astype(np.float32)
    policy = sagekv.SageKV(budget, group=group)
    kept = sagekv.select(policy, to_library(query, library), to_library(keys, library))
    assert type(kept).__module__.split(".")[0] == library
    kept = to_numpy(kept)
    g = hq // hkv
    s, k, r = policy.split(g)
    if n > s + g * k + r + 1:
        per_row = s + k + r + 1 if group == "query_head" else s + g * k + r + 1
        assert kept.shape == (hq if group == "query_head" else hkv, per_row)
    else:
        assert kept.shape == (hq if group == "query_head" else hkv, n)
    assert_valid_selection(kept, policy_reference(policy, query[:, None], keys))


@pytest.mark.parametrize("library", LIBRARIES)
def test_select_with_explicit_split(library):
    rng = np.random.default_rng(7)
    query = rng.standard_normal((8, 16)).astype(np.float32)
    keys = rng.standard_normal((2, 200, 16)).astype(np.float32)
    policy = sagekv.SageKV(64, sink=3, topk=5, recent=11)
    kept = to_numpy(sagekv.select(policy, to_library(query, library), to_library(keys, library)))
    assert kept.shape == (8, 3 + 5 + 11 + 1)
    assert (kept[:, :3] == np.arange(3)).all()
    assert (kept[:, -12:] == np.arange(200 - 12, 200)).all()
    assert_valid_selection(kept, policy_reference(policy, query[:, None], keys))


@pytest.mark.parametrize("library", LIBRARIES)
def test_streaming_keeps_sink_and_recent(library):
    keys = np.zeros((2, 50, 4), np.float32)
    query = np.zeros((4, 4), np.float32)
    kept = to_numpy(sagekv.select(sagekv.StreamingLLM(10, sink=4), to_library(query, library), to_library(keys, library)))
    expected = np.concatenate([np.arange(4), np.arange(50 - 7, 50)])
    assert kept.shape == (2, 11)
    assert (kept == expected).all()


def test_full_keeps_everything():
    kept = sagekv.select(sagekv.Full(), np.zeros((4, 8)), np.zeros((2, 30, 8)))
    assert kept.shape == (2, 30) and (kept == np.arange(30)).all()


def test_paper_split():
    # arXiv 2503.08879, A.2: B = 8192 on Llama-3 (G = 4)
    assert sagekv.SageKV(8192).split(4) == (2048, 1024, 2048)
    assert sagekv.SageKV(2048).split(4) == (512, 256, 512)
    sink, topk, recent = sagekv.SageKV(8192).split(7)
    assert (sink, topk) == (2048, 585) and sink + 7 * topk + recent == 8192


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(budget=-1), "budget must be >= 1"),
        (dict(budget=0), "budget must be >= 1"),
        (dict(budget=1.5), "budget must be an integer"),
        (dict(budget=True), "budget must be an integer"),
        (dict(budget=64, sink=-2), "sink must be >= 0"),
        (dict(budget=64, group="layer"), "group must be"),
    ],
)
def test_sagekv_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sagekv.SageKV(**kwargs)


def test_budget_too_small_for_explicit_split():
    with pytest.raises(ValueError, match="smaller than sink"):
        sagekv.SageKV(16, sink=8, topk=4).split(4)


def test_streaming_validation():
    with pytest.raises(ValueError, match="must not exceed"):
        sagekv.StreamingLLM(3, sink=4)
    with pytest.raises(ValueError, match="budget must be an integer"):
        sagekv.StreamingLLM("8")


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sagekv.select(sagekv.SageKV(8), np.zeros((6, 4)), np.zeros((4, 20, 4)))
    with pytest.raises(ValueError, match="expected query"):
        sagekv.select(sagekv.SageKV(8), np.zeros((6, 4)), np.zeros((20, 4)))


@pytest.mark.parametrize("library", LIBRARIES)
def test_ties_keep_the_earliest_positions(library):
    from sagekv.ops import ops_for
    from sagekv.selection import top_positions

    scores = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], np.float32)
    x = to_library(scores, library)
    top = to_numpy(top_positions(ops_for(x), x, 4))
    assert top.tolist() == [[1, 2, 3, 4], [0, 1, 2, 3]]  # ascending, as they come


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("k", [1, 5, 16, 40])
def test_top_positions_match_a_stable_sort(library, k):
    from sagekv.ops import ops_for
    from sagekv.selection import top_positions

    rng = np.random.default_rng(k)
    scores = rng.integers(0, 6, (7, 41)).astype(np.float32)  # plateaus of ties across the k-th score
    scores[3] = 2.0  # a row of one value
    x = to_library(scores, library)
    expected = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)
    assert to_numpy(top_positions(ops_for(x), x, k)).tolist() == expected.tolist()


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("steps", [0, 1, 2, 5, 31])
@pytest.mark.parametrize("length", [1, 3, 50])
def test_carry_forward_is_the_discounted_maximum_over_the_steps_before(library, steps, length):
    from sagekv.ops import ops_for
    from sagekv.policies.base import carry_forward

    scores = np.random.default_rng(steps).random((3, length)).astype(np.float32) ** 4
    expected = scores.astype(np.float64).copy()
    for distance in range(1, steps + 1):
        expected[:, distance:] = np.maximum(expected[:, distance:], scores[:, :-distance] * 0.8**distance)
    x = to_library(scores, library)
    np.testing.assert_allclose(to_numpy(carry_forward(ops_for(x), x, steps, 0.8)), expected, rtol=1e-6)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("group", ["query_head", "kv_head"])
def test_follow_keeps_the_tokens_after_a_selected_one(library, group):
    # Every query attends to one key (position 40); the tokens after it are what a copy continues with.
    n, d, spike = 120, 8, 40
    keys = np.zeros((1, n, d), np.float32)
    keys[0, spike] = 4.0
    query = np.ones((4, d), np.float32)
    policy = sagekv.SageKV(24, sink=2, topk=2, recent=4, group=group, follow=6)
    kept = to_numpy(sagekv.select(policy, to_library(query, library), to_library(keys, library)))
    selected = kept[:, 2:-5]  # between the sink and the recent window + last token
    if group == "query_head":  # each head keeps the spike and the next one (ties keep the earliest)
        assert (np.sort(selected, axis=1) == [spike, spike + 1]).all()
    else:  # the shared selection has G x topk = 8 places: the spike, the 5 after it, then the earliest rest
        assert set(range(spike, spike + 6)) <= set(selected[0].tolist())
    plain = to_numpy(sagekv.select(sagekv.SageKV(24, sink=2, topk=2, recent=4, group=group),
                                   to_library(query, library), to_library(keys, library)))
    assert spike + 1 not in plain[:, 2:-5]  # without follow only the spike itself stands out


@pytest.mark.parametrize("library", LIBRARIES)
def test_follow_decay_shares_the_budget_between_attended_places(library):
    n, d = 120, 8
    keys = np.zeros((1, n, d), np.float32)
    keys[0, [40, 80]] = 4.0  # two places attended equally
    query = np.ones((4, d), np.float32)
    kept = {}
    for decay in (1.0, 0.8):
        policy = sagekv.SageKV(24, sink=2, topk=2, recent=4, group="kv_head", follow=8, decay=decay)
        selected = to_numpy(sagekv.select(policy, to_library(query, library), to_library(keys, library)))[0, 2:-5]
        kept[decay] = sorted(selected.tolist())
    assert kept[1.0] == list(range(40, 48))  # undiscounted, the first place takes all 8 (ties keep the earliest)
    assert kept[0.8] == [40, 41, 42, 43, 80, 81, 82, 83]  # discounted, each keeps its nearest followers
