"""Sampling: settings checked in one line, each backend's filtered distribution and its draws against
the numpy reference, and the same seed giving the same text."""

import numpy as np
import pytest

import sagekv
from conftest import to_library
from reference import sampling_probabilities
from sagekv.sampling import filtered_logits

LOGITS = np.random.default_rng(7).normal(scale=2.0, size=40).astype(np.float32)
SAMPLERS = [
    sagekv.Sampler(1.0),
    sagekv.Sampler(0.6, top_k=5),
    sagekv.Sampler(1.4, top_p=0.8),
    sagekv.Sampler(0.8, top_p=0.9, top_k=12),
    sagekv.Sampler(1.0, top_p=1e-6),  # only the most probable token reaches it
    sagekv.Sampler(2.0, top_k=1),
]


@pytest.mark.parametrize("settings", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature="1"),
    dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.0), dict(top_k=True), dict(seed=-1),
    dict(seed=2**63), dict(seed=1.5),
])
def test_bad_settings_are_refused_in_one_line(settings):
    with pytest.raises(sagekv.SageKVError) as error:
        sagekv.Sampler(**settings)
    assert next(iter(settings)) in str(error.value) and "\n" not in str(error.value)


def test_settings_are_recorded_only_when_sampling():
    assert sagekv.Sampler(top_p=0.5, seed=3).greedy and sagekv.Sampler(top_p=0.5).record() == {}
    sampler = sagekv.Sampler(0.7, top_k=40)
    assert sampler.record() == {"temperature": 0.7, "top_p": 1.0, "top_k": 40, "seed": None}
    assert sampler.describe() == "temperature 0.7, top-k 40"
    seeded = sampler.seeded()
    assert seeded.seed is not None and seeded.seeded() == seeded


def backend_module(backend):
    return pytest.importorskip(f"sagekv.backends.{backend}")


def probabilities(backend, logits, sampler):
    """The backend's filtered logits as float64 probabilities."""
    ops = backend_module(backend).Runner.ops
    filtered = np.asarray(filtered_logits(ops, to_library(logits, backend), sampler), np.float64)
    p = np.exp(filtered - filtered.max())
    return p / p.sum()


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.describe())
def test_filtered_distribution_matches_reference(backend, sampler):
    expected = sampling_probabilities(LOGITS, sampler.temperature, sampler.top_p, sampler.top_k)
    got = probabilities(backend, LOGITS, sampler)
    np.testing.assert_array_equal(got > 0, expected > 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_top_k_keeps_ties_with_the_kth(backend):
    logits = np.array([3.0, 2.0, 2.0, 1.0, 0.0], np.float32)
    sampler = sagekv.Sampler(1.0, top_k=2)
    np.testing.assert_allclose(probabilities(backend, logits, sampler), sampling_probabilities(logits, 1.0, top_k=2), rtol=1e-6)
    assert (probabilities(backend, logits, sampler) > 0).sum() == 3


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("sampler", SAMPLERS[:4], ids=lambda s: s.describe())
def test_draws_follow_the_reference(tiny_models, backend, sampler):
    """Empirical frequencies of the runner's draws from fixed logits: a chi-square statistic far below
    what a wrong distribution gives (the seed is fixed, so the test cannot flake)."""
    run = tiny_models("llama", backend).runner
    logits, draws = to_library(LOGITS, backend), 4000
    draw = run.new_draw(sagekv.Sampler(sampler.temperature, sampler.top_p, sampler.top_k, seed=11))
    counts = np.bincount([run.token_id(run.next_token(logits, draw)) for _ in range(draws)], minlength=len(LOGITS))
    expected = sampling_probabilities(LOGITS, sampler.temperature, sampler.top_p, sampler.top_k)
    assert counts[expected == 0].sum() == 0
    kept = expected > 0
    chi_square = (((counts[kept] - draws * expected[kept]) ** 2) / (draws * expected[kept])).sum()
    df = kept.sum() - 1
    assert chi_square < df + 6 * np.sqrt(2 * df), (chi_square, df)  # about the 99.99th percentile


PROMPT = "The key for door seven is 4821. Alpha beta gamma delta. " * 2


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_same_seed_same_text(tiny_models, backend):
    model = tiny_models("llama", backend)
    sampled = lambda seed: model.generate(PROMPT, max_tokens=16, sampler=sagekv.Sampler(1.0, top_p=0.95, seed=seed)).tokens  # noqa: E731
    assert sampled(5) == sampled(5)
    assert sampled(5) != sampled(6)
    greedy = model.generate(PROMPT, max_tokens=16).tokens
    assert sampled(5) != greedy
    assert model.generate(PROMPT, max_tokens=16, sampler=sagekv.Sampler(0.0, top_k=3, seed=5)).tokens == greedy
    # decoding a prefill again restarts the seed, as every policy of an evaluation sample does
    prefilled = model.prefill(model.encode(PROMPT))
    sampler = sagekv.Sampler(1.0, seed=5)
    assert model.decode(prefilled, None, 16, sampler=sampler).tokens == model.decode(prefilled, None, 16, sampler=sampler).tokens


def test_sampler_must_be_a_sampler(tiny_models):
    with pytest.raises(sagekv.SageKVError, match="sagekv.Sampler"):
        tiny_models("llama", "torch").generate(PROMPT, sampler={"temperature": 1.0})
