"""RAG over stored document caches (sagekv.rag): re-rotation, the methods, MLX against torch, the
store on disk, and SamKV's selection against a float64 reference."""

import numpy as np
import pytest

import sagekv
from conftest import model_loader, needs_mlx, needs_torch
from reference import samkv_selection, samkv_token_selection
from sagekv import rag
from sagekv.store import DocumentStore, MemoryStore

DOCUMENTS = [
    "Alpha beta gamma delta. The key for door seven is 4821. Epsilon zeta. " * 2,
    "Eta theta iota kappa lambda. The lamp in the hall is green. " * 3,
    "Mu nu xi omicron pi rho sigma tau. " * 4,
]
QUESTION = "Question: what is the key for door seven? Answer:"
TOKENS = 8
EVERYTHING = [rag.CacheBlend(ratios=(1.0,)), rag.EPIC(k=10**6), rag.SamKV(initial=10**4, local=16)]
METHODS = [rag.FullRecompute(), rag.Reuse(), rag.EPIC(), rag.CacheBlend(), rag.CacheBlend(ratios=(0.5, 0.2), check_layers=(1, 2)),
           rag.SamKV(), rag.SamKV(update="fusion"), rag.SamKV(layers=1, initial=4, local=4, block=4),
           rag.SamKV(layers=(0, 2), initial=4, local=4, block=4),
           rag.SamKV(query="last", max_kept=0.3, initial=2, local=2, block=4),
           rag.SamKV(unit="tokens", query="last", max_kept=0.3, initial=2, local=2, follow=4),
           rag.SamKV(unit="tokens", max_kept=0.3, initial=2, local=2, recompute=False, lookahead=3)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    pytest.importorskip("transformers")
    from sagekv.checkpoints import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("rag")
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return {
        "llama": make_tiny_checkpoint(root / "llama", "llama", seed=3, num_hidden_layers=4),
        "qwen2": make_tiny_checkpoint(root / "qwen2", "qwen2", seed=4, num_hidden_layers=3),
        "qwen3": make_tiny_checkpoint(root / "qwen3", "qwen3", seed=5, num_hidden_layers=3),
        "llama3": make_tiny_checkpoint(root / "llama3", "llama", seed=6, num_hidden_layers=3, rope_parameters=rope, rope_theta=None),
    }


@pytest.fixture(scope="module")
def load(checkpoints):
    return model_loader(checkpoints)


def float_keys(model, stored):
    raw, tag = stored["keys"]
    return rag.float32_of(raw, tag)


def stored(model):
    """The preamble and DOCUMENTS stored in memory, placed one after another."""
    pieces_ids = [model.preamble_ids()] + [model.encode_plain(d) for d in DOCUMENTS]
    return rag.stored_pieces(model, MemoryStore(model.store_id), pieces_ids)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "llama3"])
def test_rerotated_keys_equal_a_prefill_at_that_offset(load, family, backend):
    """Keys of a document prefilled alone at positions shift.. equal its stored keys re-rotated by shift,
    at every layer (a shift of all positions leaves attention, hence every hidden state, unchanged)."""
    model = load(family, backend)
    run = model.runner
    ids = model.encode_plain(DOCUMENTS[0])
    with run.inference():
        at_zero = rag.prefill_document(model, ids)
        for shift in (1, 37, 1000):
            moved = rag.prefill_document(model, ids, start=shift)
            rotated = run.rerotate(run.from_raw(*at_zero["keys"]), shift)
            np.testing.assert_allclose(rag.to_float(run.ops, rotated), float_keys(model, moved), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(*(rag.float32_of(*d["values"]) for d in (at_zero, moved)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_stored_document_equals_the_model_prefill(load, backend):
    """The layer-by-layer pass that stores a document gives the model's own prefill keys, values and queries."""
    model = load("llama", backend)
    run = model.runner
    ids = model.encode_plain(DOCUMENTS[1])
    with run.inference():
        stored = rag.prefill_document(model, ids)
    prefilled = model.prefill(ids, observed_queries=rag.QUERY_TAIL)
    layers = prefilled.cache if backend == "mlx" else prefilled.cache.layers
    for index, layer in enumerate(layers):
        keys = layer.keys_and_values()[0] if backend == "mlx" else layer.keys
        np.testing.assert_allclose(float_keys(model, stored)[:, index], rag.to_float(run.ops, keys[0]).swapaxes(0, 1), rtol=1e-4, atol=1e-4)
        queries = rag.float32_of(*stored["queries"])[:, index]
        np.testing.assert_allclose(queries, rag.to_float(run.ops, layer.queries).swapaxes(0, 1), rtol=1e-4, atol=1e-4)
    assert stored["queries"][0].shape[0] == min(len(ids), rag.QUERY_TAIL)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_recomputing_everything_gives_full_recompute(load, family, backend):
    model = load(family, backend)
    full = model.rag(DOCUMENTS, QUESTION, method="full_recompute", max_tokens=TOKENS)
    prompt = model.preamble_ids() + [t for d in DOCUMENTS for t in model.encode_plain(d)] + model.encode_plain(QUESTION)
    assert full.tokens == model.generate_ids(prompt, sagekv.Full(), TOKENS).tokens
    assert full.rag.kept_tokens == full.rag.total_tokens == len(prompt) - len(model.encode_plain(QUESTION))
    for method in EVERYTHING:
        result = model.rag(DOCUMENTS, QUESTION, method=method, max_tokens=TOKENS)
        assert result.tokens == full.tokens, method
        assert result.rag.kept_tokens == full.rag.total_tokens


@needs_mlx
@needs_torch
def test_mlx_and_torch_agree_on_every_method(load):
    mlx_model, torch_model = load("llama", "mlx"), load("llama", "torch")
    for method in METHODS:
        a = mlx_model.rag(DOCUMENTS, QUESTION, method=method, max_tokens=TOKENS)
        b = torch_model.rag(DOCUMENTS, QUESTION, method=method, max_tokens=TOKENS)
        assert a.tokens == b.tokens, method
        assert (a.rag.kept_tokens, a.rag.total_tokens, a.rag.kv_bytes) == (b.rag.kept_tokens, b.rag.total_tokens, b.rag.kv_bytes), method


@needs_mlx
@needs_torch
def test_a_store_written_by_one_backend_serves_the_other(load, tmp_path):
    """The same stored caches within float32 tolerance, and the same answers from either file."""
    mlx_model, torch_model = load("llama", "mlx"), load("llama", "torch")
    stores = {}
    for name, model in (("mlx", mlx_model), ("torch", torch_model)):
        stores[name] = DocumentStore(tmp_path / name, model.store_id)
        model.rag(DOCUMENTS, QUESTION, method="samkv", store=stores[name], max_tokens=2)
    files = sorted(p.name for p in (tmp_path / "mlx").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "torch").iterdir()) and len(files) == len(DOCUMENTS) + 1
    for key in (name.split("-", 1)[1].removesuffix(".safetensors") for name in files):
        a, b = stores["mlx"].get(key), stores["torch"].get(key)
        for name in ("keys", "values", "queries"):
            np.testing.assert_allclose(a.read(name), b.read(name), rtol=1e-4, atol=1e-4)
    swapped = mlx_model.rag(DOCUMENTS, QUESTION, method="samkv", store=stores["torch"], max_tokens=TOKENS)
    assert swapped.tokens == torch_model.rag(DOCUMENTS, QUESTION, method="samkv", store=stores["mlx"], max_tokens=TOKENS).tokens


def test_stored_documents_are_reused(load, tmp_path):
    model = load("llama", "torch")
    store = DocumentStore(tmp_path / "store", model.store_id)
    first = model.rag(DOCUMENTS, QUESTION, method="samkv", store=store, max_tokens=TOKENS)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "store").iterdir()}
    again = model.rag(DOCUMENTS[::-1], QUESTION, method="samkv", store=store, max_tokens=TOKENS)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "store").iterdir()} == stamps  # nothing written again
    same = model.rag(DOCUMENTS, QUESTION, method="samkv", store=store, max_tokens=TOKENS)
    assert same.tokens == first.tokens and again.rag.total_tokens == first.rag.total_tokens


def test_on_token_streams_and_stops(load):
    model = load("llama", "torch")
    whole = model.rag(DOCUMENTS, QUESTION, method="epic", max_tokens=TOKENS)
    seen = []
    cut = model.rag(DOCUMENTS, QUESTION, method="epic", max_tokens=TOKENS, on_token=lambda ids: seen.append(list(ids)) or len(ids) == 3)
    assert seen == [whole.tokens[:n] for n in (1, 2, 3)] and cut.tokens == whole.tokens[:3]


def test_samkv_keeps_anchors_and_a_share(load):
    model = load("llama", "torch")
    method = rag.SamKV(initial=4, local=4, block=4, layers=2)
    with model.runner.inference():
        pieces = stored(model)
        chosen = method.select(model, pieces, model.encode_plain(QUESTION))
    for piece, per_layer in zip(pieces, chosen):
        n = len(piece.ids)
        assert len(per_layer) == 2
        anchors = set(method.anchors(n).tolist())
        blocks_per_layer = set()
        for rows in per_layer:
            kept = set(rows.tolist())
            assert anchors <= kept and list(rows) == sorted(kept)
            starts = {4 + (r - 4) // 4 * 4 for r in kept - anchors}  # rows come in whole blocks
            assert all(set(range(b, min(b + 4, n - 4))) <= kept for b in starts)
            blocks_per_layer.add(len(starts))
        assert len(blocks_per_layer) == 1  # the document's ratio sets one block count for every layer
    result = model.rag(DOCUMENTS, QUESTION, method=method, max_tokens=TOKENS)
    assert result.rag.kept_tokens == sum(len(np.unique(np.concatenate(c))) for c in chosen)
    assert result.rag.kept_tokens < result.rag.total_tokens


@pytest.mark.parametrize("share", [0.2, 0.35, 0.5])
def test_samkv_keeps_at_most_max_kept(load, share):
    model = load("llama", "torch")
    free = model.rag(DOCUMENTS, QUESTION, method=rag.SamKV(initial=2, local=2, block=4, query="last"), max_tokens=1)
    capped = model.rag(DOCUMENTS, QUESTION, method=rag.SamKV(initial=2, local=2, block=4, query="last", max_kept=share),
                       max_tokens=1)
    limit = share * capped.rag.total_tokens
    anchors = 4 * len(DOCUMENTS) + 1  # always kept (the preamble is one token)
    assert capped.rag.kept_tokens <= max(limit, anchors)
    if free.rag.kept_tokens <= limit:
        assert capped.rag.kept_tokens == free.rag.kept_tokens and capped.tokens == free.tokens
    else:
        assert anchors < capped.rag.kept_tokens < free.rag.kept_tokens


def test_samkv_recomputes_like_a_prefill_of_the_kept_tokens(load):
    """Selected at the last layer only, every kept token is recomputed at every layer: the first
    token's logits are those of transformers' own forward over the kept tokens and the question at
    their positions in the full prompt (gaps and all)."""
    import torch

    model = load("llama", "torch")
    method = rag.SamKV(initial=4, local=4, block=4, layers=1)
    question = model.encode_plain(QUESTION)
    with model.runner.inference():
        pieces = stored(model)
        kept = [np.unique(np.concatenate(c)) for c in method.select(model, pieces, question)]
        _, logits, count = method.prefill(model, pieces, question)
        ids = [p.ids[r] for p, rows in zip(pieces, kept) for r in rows] + question
        positions = [p.start + r for p, rows in zip(pieces, kept) for r in rows]
        positions += list(range(pieces[-1].stop, pieces[-1].stop + len(question)))
        assert count == len(ids) - len(question) < pieces[-1].stop  # something was evicted
        expected = model.runner.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions])).logits[0, -1]
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_samkv_selection_matches_the_float64_reference():
    """Personalised query, retention ratio and block choice, against the spec written out in float64."""
    rng = np.random.default_rng(0)
    layers, hq, hkv, d, n, block, initial, local = 3, 8, 2, 16, 70, 8, 4, 6
    question = rng.standard_normal((layers, hq, d)).astype(np.float32)
    locals_ = [rng.standard_normal((layers, hq, d)).astype(np.float32) for _ in range(4)]
    keys = rng.standard_normal((n, layers, hkv, d)).astype(np.float32)
    keys[20:28] += 2 * question.reshape(layers, hkv, -1, d).mean(2)  # one block clearly above the rest
    method = rag.SamKV(initial=initial, local=local, block=block)
    anchors = method.anchors(n)
    for i in range(len(locals_)):
        query = rag.personalised_query(question, locals_, i)
        ops = sagekv.ops.ops_for(keys)
        anchor_score, scores = rag.block_scores(ops, query, keys, anchors, initial, n - local, block)
        keep = int(scores.shape[1] * np.mean([rag.retention_ratio(a, b) for a, b in zip(anchor_score, scores)]))
        got = rag.chosen_rows(rag.block_order(scores), anchors, initial, n - local, block, keep)
        expected = samkv_selection(question, locals_, i, keys, initial, local, block)
        assert [list(g) for g in got] == [list(e) for e in expected]
    assert any(set(range(20, 28)) <= set(rows.tolist()) for rows in got)


def test_samkv_token_selection_matches_the_float64_reference():
    rng = np.random.default_rng(1)
    layers, hq, hkv, d, initial, local = 2, 4, 2, 8, 2, 3
    lengths = [5, 30, 22, 41]
    queries = [rng.standard_normal((layers, hq, d)).astype(np.float32) for _ in lengths]
    keys = [rng.standard_normal((n, layers, hkv, d)).astype(np.float32) for n in lengths]
    keys[2][9] += 3 * queries[2].reshape(layers, hkv, -1, d).mean(2)  # one token clearly above the rest
    method = rag.SamKV(unit="tokens", max_kept=0.3, initial=initial, local=local, follow=3, decay=0.5)
    anchors = [method.anchors(n) for n in lengths]
    for share in (0.3, 0.5, 0.05):
        scores = rag.token_scores(sagekv.ops.NumpyOps, queries, keys, anchors, 3, 0.5)
        got = rag.chosen_tokens(scores, lengths, anchors, share)
        expected = samkv_token_selection(queries, keys, anchors, 3, 0.5, share)
        assert [[list(r) for r in p] for p in got] == [[list(r) for r in p] for p in expected], share
        assert rag.kept_count(got) <= max(share * sum(lengths), sum(map(len, anchors)))
    assert all(9 in rows for rows in rag.chosen_tokens(scores, lengths, anchors, 0.3)[2])  # and it follows: 10, 11
    assert {10, 11} <= set(rag.kept_rows(rag.chosen_tokens(scores, lengths, anchors, 0.5))[2].tolist())


def test_samkv_tokens_keeps_the_share(load):
    model = load("llama", "torch")
    for share in (0.25, 0.5):
        result = model.rag(DOCUMENTS, QUESTION, method=rag.SamKV(unit="tokens", max_kept=share, initial=2, local=2),
                           max_tokens=1)
        anchors = 4 * len(DOCUMENTS) + 1
        assert anchors < result.rag.kept_tokens <= share * result.rag.total_tokens


def test_samkv_lookahead_selects_again_with_the_draft_queries(load):
    """The draft is what the first selection, used as stored, answers; its scores are its attention
    over the documents and its own rows (each draft token's softmax, computed here in float64), and
    adding them changes the selection; lookahead=0 is the first selection."""
    model = load("llama", "torch")
    run = model.runner
    first = rag.SamKV(unit="tokens", max_kept=0.3, initial=2, local=2, recompute=False)
    ahead = rag.SamKV(unit="tokens", max_kept=0.3, initial=2, local=2, recompute=False, lookahead=4)
    pieces_ids, question = rag.prompt_ids(model, DOCUMENTS, QUESTION, TOKENS)
    store = MemoryStore(model.store_id)
    pieces = rag.stored_pieces(model, store, pieces_ids)
    layers = first.selection_layers(run.num_layers)
    kept = rag.kept_rows(first.select(model, pieces, question))
    draft = ahead.draft(model, pieces, question, kept)
    assert draft == rag.rag_ids(model, pieces_ids, question, first, store, 4).tokens and len(draft) == 4

    keys = [run.rerotate(p.read(run, "keys", layers=layers), p.start) for p in pieces]
    anchors = [ahead.anchors(len(p.ids)) for p in pieces]
    got = ahead.draft_scores(model, pieces, question, kept, layers, keys, anchors)
    cache = rag.repair(model, pieces, question + draft, kept, compute=np.arange(0))[0]
    expected = []
    for n in layers:
        segment = run.unwrap(cache)[n]
        q = rag.to_float(run.ops, segment.queries).astype(np.float64)  # [Hq, q + m, D]
        own = rag.to_float(run.ops, segment.keys[0, :, segment.size - len(question) - 4 : segment.size]).astype(np.float64)
        documents = np.concatenate([rag.to_float(run.ops, k[:, layers.index(n)]) for k in keys]).astype(np.float64)
        hq, _, d = q.shape
        per_head = np.zeros((own.shape[0], len(documents)))
        for head in range(hq):
            kv = head // (hq // own.shape[0])
            for t in range(4):
                row = len(question) + t
                logits = np.concatenate([documents[:, kv] @ q[head, row], own[kv, : row + 1] @ q[head, row]]) / np.sqrt(d)
                weights = np.exp(logits - logits.max())
                per_head[kv] += (weights / weights.sum())[: len(documents)]
        expected.append(per_head)
    expected = np.stack(expected)
    start = 0
    for k, rows in zip(keys, anchors):  # as token_scores treats the question's
        part = expected[..., start : start + len(k)]
        part[..., rows] = 0.0
        part[...] = rag.carry_forward(sagekv.ops.NumpyOps, part.copy(), ahead.follow - 1, ahead.decay)
        part[..., rows] = -1.0
        start += len(k)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    again = ahead.select(model, pieces, question)
    assert rag.kept_count(again) <= 0.3 * pieces[-1].stop
    assert [r.tolist() for r in rag.kept_rows(again)] != [r.tolist() for r in kept]


def test_sagekv_policy_after_a_method(load):
    model = load("llama", "torch")
    plain = model.rag(DOCUMENTS, QUESTION, method="samkv", max_tokens=TOKENS)
    evicted = model.rag(DOCUMENTS, QUESTION, method="samkv", max_tokens=TOKENS, policy=sagekv.SageKV(32))
    assert evicted.rag.kv_bytes < plain.rag.kv_bytes
    assert evicted.tokens[0] == plain.tokens[0]  # the first token comes before any eviction
    with pytest.raises(sagekv.SageKVError, match="observes 64 queries"):
        model.rag(DOCUMENTS, QUESTION, method="reuse", max_tokens=2, policy=sagekv.SnapKV(128, window=64))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: m.rag([], QUESTION), "no documents given"),
        (lambda m: m.rag("one string", QUESTION), "no documents given"),
        (lambda m: m.rag(["text", "  "], QUESTION), "a document is empty"),
        (lambda m: m.rag(DOCUMENTS, " "), "the question is empty"),
        (lambda m: m.rag(DOCUMENTS, QUESTION, method="nope"), "unknown method 'nope'"),
        (lambda m: m.rag(["word " * 1000], QUESTION), "exceed the 4096 positions"),
        (lambda m: m.rag(DOCUMENTS, QUESTION, max_tokens=-1), "max_tokens must be a non-negative integer"),
        (lambda m: m.rag(DOCUMENTS, QUESTION, method=rag.CacheBlend(check_layers=(3,))), "check layers must come before"),
        (lambda m: m.rag(DOCUMENTS, QUESTION, method=rag.SamKV(layers=(1, 9))), "selection layer 9 is beyond the model's 4 layers"),
    ],
)
def test_bad_input_is_one_line(load, call, message):
    with pytest.raises(sagekv.SageKVError, match=message) as error:
        call(load("llama", "torch"))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: rag.SamKV(update="blend"), "update must be"),
        (lambda: rag.SamKV(theta=0), "theta must be in"),
        (lambda: rag.SamKV(local=rag.QUERY_TAIL + 1), "local must be at most"),
        (lambda: rag.SamKV(block=0), "block must be >= 1"),
        (lambda: rag.SamKV(query="first"), "query must be"),
        (lambda: rag.SamKV(max_kept=0), "max_kept must be a share"),
        (lambda: rag.EPIC(k=-1), "k must be >= 0"),
        (lambda: rag.CacheBlend(ratios=(0.1, 0.2), check_layers=(1, 2)), "not increase"),
        (lambda: rag.CacheBlend(ratios=(0.1,), check_layers=(1, 2)), "one ratio per check layer"),
        (lambda: rag.CacheBlend(check_layers=(0,)), "ascending layer indices from 1"),
        (lambda: rag.SamKV(layers=(2, 1)), "layers must be a count or ascending layer indices from 0"),
        (lambda: rag.SamKV(layers=()), "layers must be a count or ascending layer indices from 0"),
        (lambda: rag.SamKV(unit="tokens"), "needs max_kept"),
        (lambda: rag.SamKV(unit="token", max_kept=0.2), "unit must be"),
        (lambda: rag.SamKV(follow=0), "follow must be >= 1"),
        (lambda: rag.SamKV(decay=0), "decay must be a number"),
        (lambda: rag.SamKV(unit="tokens", max_kept=0.2, lookahead=-1), "lookahead must be >= 0"),
        (lambda: rag.SamKV(lookahead=8), "lookahead needs unit='tokens'"),
    ],
)
def test_bad_method_settings(make, message):
    with pytest.raises(sagekv.SageKVError, match=message):
        make()
