"""Saved caches: a prefilled prompt or a selected cache written to one safetensors file and loaded back,
on either backend; a question appended to a loaded document decodes as the whole prompt would."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

import sagekv
import sagekv.store as store
from conftest import DiskFills, needs_mlx, needs_torch, one_line_error
from sagekv.saved_cache import FORMAT, VERSION

DOCUMENT = "Alpha beta gamma delta. The key for door seven is 4821. Epsilon zeta eta theta iota. " * 3
QUESTIONS = ["Key? ", "Which door has key 4821? "]  # shorter than SnapKV's window: it reads the document's queries
BUDGET = 32
WINDOW = 32  # the last prompt queries saved with the document: SnapKV's window
POLICIES = [
    sagekv.Full(),
    sagekv.SageKV(BUDGET),  # per-query-head selections
    sagekv.SageKV(BUDGET, group="kv_head", follow=8, decay=0.8),
    sagekv.SnapKV(BUDGET),
    sagekv.Quest(BUDGET, page=8, dense_layers=1),  # one full layer and one paged one
]
BACKENDS = ["mlx", "torch"]


def same_kept(a, b):
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def model_of(tiny_models, backend):
    pytest.importorskip("mlx_lm" if backend == "mlx" else "torch")
    return tiny_models("llama", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_questions_after_a_loaded_document_equal_the_whole_prompts(tiny_models, tmp_path, backend):
    model = model_of(tiny_models, backend)
    document = model.encode(DOCUMENT)
    path = model.save_cache(model.prefill(document, WINDOW), tmp_path / "document.safetensors")
    loaded = model.load_cache(path)
    assert loaded.ids == document and loaded.selected_by is None
    for text in QUESTIONS:
        question = model.encode_plain(text)
        for policy in POLICIES:
            whole = model.generate_ids(document + question, policy, 12)
            asked = model.decode(model.extend(loaded, question), policy, 12)  # the loaded document serves every question
            assert asked.tokens == whole.tokens, (text, policy)
            assert same_kept(asked.kept_positions, whole.kept_positions), (text, policy)
            assert asked.prompt_tokens == len(document) + len(question)
            assert asked.stats.full_kv_bytes == whole.stats.full_kv_bytes
    evicting = model.decode(model.extend(loaded, model.encode_plain(QUESTIONS[0])), POLICIES[1], 1)
    assert evicting.stats.kept_kv_bytes < evicting.stats.full_kv_bytes


@needs_mlx
@needs_torch
@pytest.mark.parametrize("saved_on,loaded_on", [("mlx", "torch"), ("torch", "mlx")])
def test_a_file_saved_on_one_backend_loads_on_the_other(tiny_models, tmp_path, saved_on, loaded_on):
    saver, loader = tiny_models("llama", saved_on), tiny_models("llama", loaded_on)
    document, question = saver.encode(DOCUMENT), saver.encode_plain(QUESTIONS[0])
    prefilled = saver.prefill(document, WINDOW)
    path = saver.save_cache(prefilled, tmp_path / "document.safetensors")
    loaded = loader.load_cache(path)
    np.testing.assert_allclose(loader.runner.logits_numpy(loaded.logits), saver.runner.logits_numpy(prefilled.logits),
                               rtol=0, atol=0)  # saved as they were
    np.testing.assert_allclose(loader.runner.logits_numpy(loader.extend(loaded, question).logits),
                               saver.runner.logits_numpy(saver.extend(prefilled, question).logits), rtol=1e-4, atol=1e-4)
    for policy in POLICIES:
        there = loader.decode(loader.extend(loaded, question), policy, 12)
        here = saver.decode(saver.extend(prefilled, question), policy, 12)
        assert there.tokens == here.tokens, policy
        assert same_kept(there.kept_positions, here.kept_positions), policy
    assert loader.decode(loaded, None, 12).tokens == saver.decode(prefilled, None, 12).tokens  # the document alone


@pytest.mark.parametrize("loaded_on", BACKENDS)
@pytest.mark.parametrize("saved_on", BACKENDS)
def test_a_selected_cache_saves_and_decodes_as_it_would_have(tiny_models, tmp_path, saved_on, loaded_on):
    saver, loader = model_of(tiny_models, saved_on), model_of(tiny_models, loaded_on)
    prompt = saver.encode(DOCUMENT + QUESTIONS[0])
    for index, policy in enumerate(POLICIES):
        selected = saver.select(saver.prefill(prompt, policy.observed_queries), policy)
        path = saver.save_cache(selected, tmp_path / f"selected{index}.safetensors")
        loaded = loader.load_cache(path)
        assert loaded.selected_by == repr(policy)
        expected = saver.decode(selected, None, 12)
        for _ in range(2):  # decoding copies the loaded cache, so it decodes again
            again = loader.decode(loaded, None, 12)
            assert again.tokens == expected.tokens, policy
            assert same_kept(again.kept_positions, expected.kept_positions), policy
            assert (again.stats.full_kv_bytes, again.stats.kept_kv_bytes) == (expected.stats.full_kv_bytes, expected.stats.kept_kv_bytes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_misuse_of_prefilled_and_selected_caches_is_refused(tiny_models, tmp_path, backend):
    model = model_of(tiny_models, backend)
    prompt = model.encode(DOCUMENT)
    selected = model.select(model.prefill(prompt), POLICIES[1])
    one_line_error(lambda: model.decode(selected, POLICIES[1], 4), "selected by SageKV(", "policy None")
    one_line_error(lambda: model.extend(selected, [65]), "full prefilled cache only")
    one_line_error(lambda: model.select(selected, POLICIES[1]), "selected by SageKV(")
    prefilled = model.prefill(prompt)
    one_line_error(lambda: model.extend(prefilled, []), "no tokens to append")
    model.decode(prefilled, POLICIES[1], 2, keep_prefill=False)
    for call in (lambda: model.decode(prefilled, None, 2), lambda: model.extend(prefilled, [65]),
                 lambda: model.save_cache(prefilled, tmp_path / "x.safetensors")):
        one_line_error(call, "taken over by an earlier call with keep_prefill=False")
    one_line_error(lambda: model.save_cache(prompt, tmp_path / "x.safetensors"), "save_cache takes a prompt's cache", "got list")
    assert not os.path.exists(tmp_path / "x.safetensors")


@needs_torch
def test_the_file_is_plain_safetensors_with_its_metadata(tiny_models, tmp_path):
    from safetensors import safe_open

    model = tiny_models("llama", "torch")
    prefilled = model.prefill(model.encode(DOCUMENT), WINDOW)
    path = model.save_cache(model.select(prefilled, POLICIES[4]), tmp_path / "quest.safetensors")
    with safe_open(path, "np") as f:
        metadata = f.metadata()
        names = set(f.keys())
        ids = f.get_tensor("ids")
    assert ids.tolist() == prefilled.ids
    assert {k: metadata[k] for k in ("format", "version", "model", "dtype", "observed_queries")} == {
        "format": FORMAT, "version": VERSION, "model": model.store_id, "dtype": "float32", "observed_queries": str(WINDOW)}
    assert metadata["selected_by"] == repr(POLICIES[4]) and len(metadata["checksum"]) == 64
    layers = json.loads(metadata["layers"])
    assert layers[0] is None and layers[1]["kind"] == "QuestKV"  # the dense layer keeps its whole cache
    assert {"layers.0.keys", "layers.0.values", "layers.1.keys", "layers.1.page_min"} <= names
    assert "layers.0.queries" not in names  # selection no longer needs them


# --- one-line errors for files that cannot be loaded -----------------------------------------------------


@pytest.fixture
def saved(tiny_models, tmp_path):
    pytest.importorskip("torch")
    model = tiny_models("llama", "torch")
    return model, model.save_cache(model.prefill(model.encode(DOCUMENT), WINDOW), tmp_path / "document.safetensors")


def resigned(path, **changes):
    """The file rewritten by another writer: its metadata changed, with a valid checksum."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        header, start = store.read_header(file, size)
        layout, begins = store.tensor_table(header, size - start)
        arrays = {}
        for name, (tag, shape) in layout.items():
            file.seek(start + begins[name])
            arrays[name] = np.fromfile(file, store.NUMPY_DTYPES[tag], int(np.prod(shape))).reshape(shape)
    metadata = {k: v for k, v in header["__metadata__"].items() if k != "checksum"}
    store.write_file(path, arrays, {name: tag for name, (tag, _) in layout.items()}, {**metadata, **changes})


def flip_data_byte(path):
    data = bytearray(Path(path).read_bytes())
    data[-5] ^= 0x10
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda path: os.remove(path), "cannot read cache file {path}: No such file or directory"),
        (lambda path: Path(path).write_text("not a cache at all"), "cache file {path} is not a safetensors file (header length"),
        (lambda path: os.truncate(path, os.path.getsize(path) - 3), "cache file {path} is damaged (the tensors take"),
        (flip_data_byte, "cache file {path} is damaged (checksum mismatch); save it again"),
        (lambda path: resigned(path, version="2"), "cache file {path} has format version '2', this sagekv reads '1'"),
        (lambda path: resigned(path, format="sagekv-document"), "{path} is not a sagekv cache file (its format is 'sagekv-document')"),
        (lambda path: resigned(path, model="feedfacefeedface"), "cache file {path} was saved with another model (weights 'feedfacefeedface'"),
    ],
)
def test_a_file_that_cannot_be_loaded_gives_one_line(saved, damage, message):
    model, path = saved
    damage(path)
    one_line_error(lambda: model.load_cache(path), message.format(path=path))


def test_a_file_of_other_weights_or_dtype_is_refused(saved, tiny_models, tiny_checkpoints):
    _, path = saved
    one_line_error(lambda: tiny_models("mistral", "torch").load_cache(path), "was saved with another model")
    bfloat16 = sagekv.load(tiny_checkpoints["llama"], backend="torch", device="cpu", dtype="bfloat16")
    one_line_error(lambda: bfloat16.load_cache(path), "holds 'float32' caches but the model computes in bfloat16")


def test_a_failed_write_keeps_the_file_that_was_there(saved, tmp_path, monkeypatch):
    model, path = saved
    before = Path(path).read_bytes()
    real = store._open_temporary

    def filling(directory, name):
        file, temporary = real(directory, name)
        return DiskFills(file, 5000, OSError(errno.ENOSPC, "No space left on device")), temporary

    monkeypatch.setattr(store, "_open_temporary", filling)
    one_line_error(lambda: model.save_cache(model.prefill(model.encode("other text " * 20)), path),
                   f"cannot write cache file {path}: No space left on device")
    assert Path(path).read_bytes() == before and sorted(os.listdir(tmp_path)) == ["document.safetensors"]
