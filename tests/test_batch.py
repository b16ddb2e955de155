"""Batched generation (SageModel.generate_batch, decode_batch; sagekv.cache.BatchKV): each prompt of a batch
gets the tokens it gets alone, on both backends and under each kind of cache, with prompts of different
lengths (one within the budget, so it keeps everything and is padded), sequences that end early, stops and
sampling; step by step, the batch's logits are each prompt's alone."""

import numpy as np
import pytest

import sagekv
from conftest import one_line_error
from sagekv.policies import make_policy
from sagekv.tasks import generate

BUDGET = 32
TOKENS = 40  # past the ring of every policy at BUDGET: decoded tokens overwrite the oldest ones
# a prompt within the budget (it keeps everything), and two long ones of different lengths
PROMPTS = ["Door seven: 4821.", generate("single_needle", 400, seed=0).prompt, generate("multi_key", 520, seed=1).prompt]
POLICIES = ["full", "sagekv_kv_follow", "sagekv", "snapkv", "streaming"]
BACKENDS = ["torch", "mlx"]


def prefilled_for(model, prompt: str, policy):
    """``prompt`` prefilled and selected as generate does it."""
    prefilled = model.prefill_for(model.encode(prompt), policy, None)
    return prefilled if prefilled.selected_by is not None else model.select(prefilled, policy, keep_prefill=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", POLICIES)
def test_batch_gives_each_prompt_its_tokens_alone(tiny_models, backend, name):
    model = tiny_models("llama", backend)
    policy = make_policy(name, BUDGET)
    alone = [model.generate(prompt, policy, TOKENS) for prompt in PROMPTS]
    batch = model.generate_batch(PROMPTS, policy, TOKENS)
    assert [r.tokens for r in batch] == [r.tokens for r in alone]
    assert max(len(r.tokens) for r in alone) == TOKENS  # (a sequence may end early at its own end-of-sequence)
    for got, expected in zip(batch, alone):
        assert got.text == expected.text and got.prompt_tokens == expected.prompt_tokens
        assert got.stats.kept_kv_bytes == expected.stats.kept_kv_bytes
        assert (got.kept_positions is None) == (expected.kept_positions is None)
        if got.kept_positions is not None:
            assert all(np.array_equal(a, b) for a, b in zip(got.kept_positions, expected.kept_positions))
    assert batch[0].kept_positions is None  # the short prompt kept everything, so its rows were padded
    assert (batch[1].kept_positions is None) == (name == "full")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", POLICIES)
def test_batch_logits_are_each_prompts_alone(tiny_models, backend, name):
    """Teacher-forced steps, each row on its own greedy tokens: the batch's logits are each prompt's alone
    (within float error, which token equality alone could hide behind a tie)."""
    model = tiny_models("llama", backend)
    run = model.runner
    policy = make_policy(name, BUDGET)
    prefilled = [prefilled_for(model, prompt, policy) for prompt in PROMPTS]
    alone = [run.clone_cache(p.cache) for p in prefilled]
    batch = model.stack([p.cache for p in prefilled], TOKENS)
    logits = [run.logits_numpy(p.logits) for p in prefilled]
    for step in range(TOKENS):
        tokens = [int(np.argmax(row)) for row in logits]
        logits = [run.logits_numpy(run.forward([token], cache)) for token, cache in zip(tokens, alone)]
        batched = run.logits_numpy(run.forward(run.ops.asarray(np.array(tokens), like=prefilled[0].logits), batch))
        assert batched.shape == (len(PROMPTS), len(logits[0]))
        np.testing.assert_allclose(batched, np.stack(logits), rtol=1e-4, atol=1e-4, err_msg=f"step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_end_on_their_own(tiny_models, backend, monkeypatch):
    """A token one sequence emits early made end-of-sequence: that sequence ends there, the others run on, each
    as alone; and a stop ends its own sequence only."""
    model = tiny_models("llama", backend)
    policy = make_policy("sagekv", BUDGET)
    free = [r.tokens for r in model.generate_batch(PROMPTS, policy, TOKENS)]
    monkeypatch.setattr(model.runner, "eos_ids", {free[1][3]})
    alone = [model.generate(prompt, policy, TOKENS).tokens for prompt in PROMPTS]
    batch = [r.tokens for r in model.generate_batch(PROMPTS, policy, TOKENS)]
    assert batch == alone
    assert len(batch[1]) == 3 and max(len(tokens) for tokens in batch) > 3

    monkeypatch.undo()
    seen = []
    stopped = model.generate_batch(PROMPTS, policy, TOKENS, on_token=lambda index, tokens: seen.append(index) or
                                   (index == 2 and len(tokens) == 5))
    assert [r.tokens for r in stopped] == [free[0], free[1], free[2][:5]]
    assert seen.count(2) == 5 and seen.count(0) == TOKENS


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_batch_draws_each_prompts_own_tokens(tiny_models, backend):
    """Seeded: each prompt samples what it samples alone with that seed. Unseeded: each prompt its own fresh
    seed, so the same prompt twice gives two samples."""
    model = tiny_models("llama", backend)
    policy = make_policy("sagekv_kv_follow", BUDGET)
    sampler = sagekv.Sampler(temperature=1.0, top_p=0.9, seed=5)
    alone = [model.generate(prompt, policy, 16, sampler=sampler).tokens for prompt in PROMPTS]
    assert [r.tokens for r in model.generate_batch(PROMPTS, policy, 16, sampler=sampler)] == alone
    twice = model.generate_batch([PROMPTS[1]] * 2, policy, 16, sampler=sagekv.Sampler(temperature=1.0))
    assert twice[0].tokens != twice[1].tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_prompt_and_no_tokens(tiny_models, backend):
    model = tiny_models("llama", backend)
    policy = make_policy("snapkv", BUDGET)
    assert [r.tokens for r in model.generate_batch(PROMPTS[1:2], policy, 8)] == [model.generate(PROMPTS[1], policy, 8).tokens]
    assert [r.tokens for r in model.generate_batch(PROMPTS, policy, 0)] == [[]] * 3
    assert [r.tokens for r in model.generate_batch(PROMPTS, policy, 1)] == [model.generate(p, policy, 1).tokens for p in PROMPTS]


def test_bad_batches_are_refused_in_one_line(tiny_models):
    model = tiny_models("llama", "torch")
    policy = make_policy("sagekv", BUDGET)
    one_line_error(lambda: model.generate_batch([], policy), "non-empty list")
    one_line_error(lambda: model.generate_batch("one prompt", policy), "non-empty list")
    one_line_error(lambda: model.generate_batch(["fine", 7], policy), "prompts[1] must be a str")
    one_line_error(lambda: model.generate_batch(["fine", "  \n"], policy), "prompts[1] is empty")
    one_line_error(lambda: model.generate_batch(PROMPTS, sagekv.Quest(64, page=8)), "quest cannot decode a batch")
    one_line_error(lambda: model.generate_batch(PROMPTS, policy, -1), "max_tokens")
    one_line_error(lambda: model.generate_batch(PROMPTS, "sagekv"), "policy must be")


def test_caches_that_do_not_stack_are_refused(tiny_models):
    """Quest's pages (selected before decode_batch, so its policy is not seen) cannot be stacked."""
    model = tiny_models("llama", "torch")
    quest = sagekv.Quest(64, page=8, dense_layers=0)
    prefilled = [model.select(model.prefill(model.encode(prompt)), quest) for prompt in PROMPTS[1:]]
    one_line_error(lambda: model.decode_batch(prefilled, None, 4), "QuestKV caches cannot be decoded in a batch")
    one_line_error(lambda: model.decode_batch([model.prefill(model.encode(p)) for p in PROMPTS[1:]], quest, 4),
                   "quest cannot decode a batch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_every_family_batches(tiny_models, backend, family):
    """Per-head selection over other group sizes (Qwen2's 7 query heads to 1 KV head) and Qwen3's norms."""
    model = tiny_models(family, backend)
    policy = make_policy("sagekv", BUDGET)
    assert [r.tokens for r in model.generate_batch(PROMPTS, policy, 30)] == [model.generate(p, policy, 30).tokens for p in PROMPTS]
