"""The document store: safetensors files of named arrays, checked before use, read row by row."""

import errno
import hashlib
import json
import os
import shutil
import struct
import tracemalloc

import numpy as np
import pytest

import sagekv.store as store
from conftest import DiskFills, one_line_error
from sagekv.store import DocumentStore, MemoryStore, content_key

MODEL = "0123456789abcdef"
KEY = content_key([1, 2, 3])
rng = np.random.default_rng(0)
TENSORS = {  # name -> (array, tag); keys/values laid out [tokens, layers, kv_heads, head_dim]
    "keys": (rng.standard_normal((40, 6, 2, 8)).astype(np.float32), "F32"),
    "values": (rng.standard_normal((40, 6, 2, 8)).astype(np.float16), "F16"),
    "queries": (rng.integers(0, 2**16, (40, 6, 3), dtype=np.uint16), "BF16"),
    "positions": (np.arange(40, dtype=np.int64) * 3 - 7, "I64"),
    "mask": (rng.integers(-9, 9, (5, 7), dtype=np.int32), "I32"),
    "scale": (np.array(0.5, np.float64), "F64"),
    "none": (np.zeros((0, 4), np.float32), "F32"),
}
META = {"text": "aaaa", "tokens": "40"}


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test starts with no file verified, as a new process would."""
    monkeypatch.setattr(store, "_verified", set())


def new_process():
    store._verified.clear()


@pytest.fixture(params=["directory", "memory"])
def any_store(request, tmp_path):
    return DocumentStore(tmp_path, MODEL) if request.param == "directory" else MemoryStore(MODEL)


# --- keys -----------------------------------------------------------------------------------------


def test_content_key_hashes_int64_little_endian_ids():
    ids = [5, 0, 70000, 2**40]
    expected = hashlib.sha256(struct.pack("<4q", *ids)).hexdigest()[:32]
    assert content_key(ids) == content_key(np.array(ids, np.int64)) == expected
    assert content_key(ids[:3]) == content_key(np.array(ids[:3], np.int32)) != expected


@pytest.mark.parametrize("ids", [[], [1.5, 2.0], [[1, 2]], [True], [2**70]])
def test_content_key_refuses_what_is_not_token_ids(ids):
    one_line_error(lambda: content_key(ids), "token ids")


# --- round trip -------------------------------------------------------------------------------------

READS = [
    (None, None),
    (slice(5, 20, 3), None),
    ([0, 1, 2, 39], None),
    (np.array([39, 0, 0]), None),
    (None, slice(2, 5)),
    (slice(1, 4), [5, 1]),
    ([0, 1, 2, 30, 31], np.array([4, 5])),
    ([], [1]),
]


def expected_read(array, rows, layers):
    rows = slice(None) if rows is None else rows
    if layers is None:
        return array[rows]
    if not isinstance(rows, slice) and not isinstance(layers, slice):
        return array[np.ix_(np.asarray(rows, int), np.asarray(layers))]
    return array[rows][:, layers]


def test_round_trip(any_store):
    written = any_store.put(KEY, TENSORS, META)
    new_process()
    for document in (written, any_store.get(KEY)):
        assert document.key == KEY and document.meta == META
        assert document.names == tuple(TENSORS)
        for name, (array, tag) in TENSORS.items():
            assert document.dtype(name) == tag and document.shape(name) == array.shape
            whole = document.read(name)
            assert whole.dtype == array.dtype and np.array_equal(whole, array)
        for name in ("keys", "values", "queries"):
            for rows, layers in READS:
                got = document.read(name, rows=rows, layers=layers)
                np.testing.assert_array_equal(got, expected_read(TENSORS[name][0], rows, layers))
                assert type(got) is np.ndarray and got.flags.c_contiguous and got.flags.writeable
    document.read("keys", rows=[0])[:] = 0  # a copy: the store keeps its values
    assert np.array_equal(any_store.get(KEY).read("keys", rows=[0]), TENSORS["keys"][0][:1])


def test_file_layout_and_permissions(tmp_path):
    document = DocumentStore(tmp_path, MODEL).put(KEY, TENSORS, META)
    assert document.path == str(tmp_path / f"{MODEL}-{KEY}.safetensors")
    assert os.listdir(tmp_path) == [os.path.basename(document.path)]  # no probe or temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(document.path).st_mode & 0o777 == 0o666 & ~umask
    with open(document.path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
    assert (8 + length) % 8 == 0  # the data starts aligned


def test_safe_open_reads_the_file_with_numpy(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    document = DocumentStore(tmp_path, MODEL).put(KEY, TENSORS, META)
    with safetensors.safe_open(document.path, framework="numpy") as f:
        metadata = f.metadata()
        for name, (array, tag) in TENSORS.items():
            if tag != "BF16":
                got = f.get_tensor(name)
                assert got.dtype == array.dtype and np.array_equal(got, array)
    assert {k: metadata[k] for k in ("format", "version", "model", "key")} == {
        "format": "sagekv-document", "version": "1", "model": MODEL, "key": KEY}
    assert len(metadata["checksum"]) == 64 and all(metadata[k] == v for k, v in META.items())


def test_safe_open_reads_bfloat16_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors = pytest.importorskip("safetensors")
    values = torch.tensor([[1.5, -2.0, 3.140625], [0.0, 65280.0, -1e-3]], dtype=torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    document = DocumentStore(tmp_path, MODEL).put(KEY, {"x": (bits, "BF16")})
    with safetensors.safe_open(document.path, framework="pt") as f:
        got = f.get_tensor("x")
    assert got.dtype == torch.bfloat16 and torch.equal(got, values)
    assert np.array_equal(document.read("x").astype(np.uint32) << 16, values.float().numpy().view(np.uint32))


# --- adding -------------------------------------------------------------------------------------------


def test_put_of_a_stored_key_writes_nothing(any_store):
    first = any_store.put(KEY, TENSORS, META)
    if first.path:
        os.utime(first.path, ns=(10**18, 10**18))  # a rewrite would change it
    other = {"keys": (np.zeros(3, np.float32), "F32")}
    again = any_store.put(KEY, other, {"text": "bbbb"})
    assert again.meta == META and again.names == tuple(TENSORS)
    assert np.array_equal(again.read("keys"), TENSORS["keys"][0])
    if first.path:
        assert os.stat(first.path).st_mtime_ns == 10**18
    assert any_store.get(content_key([4])) is None


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch, failure):
    documents = DocumentStore(tmp_path, MODEL)
    real = store._open_temporary

    def filling(directory, name):
        file, path = real(directory, name)
        return DiskFills(file, 5000, failure), path

    monkeypatch.setattr(store, "_open_temporary", filling)
    if isinstance(failure, OSError):
        one_line_error(lambda: documents.put(KEY, TENSORS, META), "cannot write document file", "No space left on device")
    else:
        with pytest.raises(KeyboardInterrupt):
            documents.put(KEY, TENSORS, META)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(store, "_open_temporary", real)
    assert documents.get(KEY) is None and documents.put(KEY, TENSORS, META).meta == META


# --- refusing damaged and foreign files -----------------------------------------------------------------


def flip_data_byte(path):
    with open(path, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x10]))


def edit_meta_in_header(path):  # valid JSON and structure: only the checksum can tell
    data = open(path, "rb").read()
    assert data.count(b'"aaaa"') == 1
    open(path, "wb").write(data.replace(b'"aaaa"', b'"aaab"'))


def truncate(path):
    os.truncate(path, os.path.getsize(path) - 3)


def huge_header_length(path):
    with open(path, "r+b") as f:
        f.write((2**62).to_bytes(8, "little"))


def garbage_header(path):
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\x00[[[")


def too_short(path):
    open(path, "wb").write(b"\x01\x02")


@pytest.mark.parametrize("damage", [flip_data_byte, edit_meta_in_header, truncate, huge_header_length, garbage_header, too_short])
def test_a_damaged_file_is_refused_and_kept(tmp_path, damage):
    documents = DocumentStore(tmp_path, MODEL)
    path = documents.put(KEY, TENSORS, META).path
    damage(path)
    new_process()
    damaged = open(path, "rb").read()
    one_line_error(lambda: documents.get(KEY), path, "damaged", "delete it")
    one_line_error(lambda: documents.put(KEY, TENSORS, META), path, "delete it")  # nor replaced by put
    assert open(path, "rb").read() == damaged


def write_signed(path, tensors, data, **metadata):
    """A file from another writer: its own tensor table and metadata, with a valid checksum."""
    header = {**tensors, "__metadata__": {"format": "sagekv-document", "version": "1", "model": MODEL, "key": KEY, **metadata}}
    checksum = store._checksum_start(header)
    checksum.update(data)
    header["__metadata__"]["checksum"] = checksum.hexdigest()
    text = json.dumps(header).encode()
    open(path, "wb").write(len(text).to_bytes(8, "little") + text + data)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    "tensors,metadata,message",
    [
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, {}, "overlaps or leaves gaps"),
        ({"a": entry("F32", [1], 0, 4), "b": entry("F32", [2], 8, 16)}, {}, "overlaps or leaves gaps"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [4], 8, 24)}, {}, "the tensors take 24 bytes, the file holds 16"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [3], 8, 16)}, {}, "do not match its shape and dtype"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("C64", [1], 8, 16)}, {}, "no known dtype"),
        ({"a": entry("F32", [2.0], 0, 8), "b": entry("F32", [2], 8, 16)}, {}, "no valid shape"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 8, 16)}, {"format": "other"}, "not a sagekv document"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 8, 16)}, {"version": "2"}, "format version '2'"),
    ],
)
def test_a_file_with_a_valid_checksum_and_a_bad_table_is_refused(tmp_path, tensors, metadata, message):
    documents = DocumentStore(tmp_path, MODEL)
    write_signed(documents.path(KEY), tensors, bytes(range(16)), **metadata)
    one_line_error(lambda: documents.get(KEY), documents.path(KEY), message, "delete it")


def test_a_file_of_another_model_or_key_is_refused(tmp_path):
    other = DocumentStore(tmp_path, "feedfacefeedface").put(KEY, TENSORS, META)
    documents = DocumentStore(tmp_path, MODEL)
    assert documents.get(KEY) is None
    shutil.copy(other.path, documents.path(KEY))
    one_line_error(lambda: documents.get(KEY), documents.path(KEY), "belongs to another model", "feedfacefeedface")
    os.replace(documents.path(KEY), documents.path(content_key([9])))
    one_line_error(lambda: documents.get(content_key([9])), "belongs to another model")
    os.replace(DocumentStore(tmp_path, MODEL).put(KEY, TENSORS).path, documents.path(content_key([8])))
    one_line_error(lambda: documents.get(content_key([8])), documents.path(content_key([8])), "holds another document")


def test_a_file_changed_after_get_is_not_read(tmp_path):
    documents = DocumentStore(tmp_path, MODEL)
    document = documents.put(KEY, TENSORS, META)
    os.utime(document.path, ns=(10**18, 10**18))
    one_line_error(lambda: document.read("keys"), document.path, "changed since it was checked")


# --- the store directory -----------------------------------------------------------------------------


def test_store_root_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(lambda: DocumentStore(tmp_path / "file", MODEL), "is a file, not a directory")
    one_line_error(lambda: DocumentStore(tmp_path / "file" / "below", MODEL), "cannot create document store")


def test_store_root_is_created(tmp_path):
    documents = DocumentStore(tmp_path / "a" / "b", MODEL)
    assert documents.root == str(tmp_path / "a" / "b") and os.listdir(documents.root) == []


def test_store_root_not_writable(tmp_path, monkeypatch):
    def refused(directory, name):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(directory, name))

    monkeypatch.setattr(store, "_open_temporary", refused)
    one_line_error(lambda: DocumentStore(tmp_path, MODEL), str(tmp_path), "is not writable", "Permission denied")


# --- memory and hashing -------------------------------------------------------------------------------------


def test_reading_rows_reads_only_those_rows(tmp_path):
    keys = np.random.default_rng(1).standard_normal((8192, 4, 8, 64), dtype=np.float32)  # 64 MiB
    documents = DocumentStore(tmp_path, MODEL)
    documents.put(KEY, {"keys": (keys, "F32")})
    new_process()
    tracemalloc.start()
    try:
        document = documents.get(KEY)  # hashes the file in chunks
        _, hashing_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        rows = document.read("keys", rows=[0, 1, 2, 5000], layers=[1, 3])
        _, reading_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(rows, keys[[0, 1, 2, 5000]][:, [1, 3]])
    assert hashing_peak < 8 << 20
    assert reading_peak < 256 << 10  # 4 rows x 2 layers x 2 KiB is 16 KiB; the file is 64 MiB


def test_checksum_is_verified_once_per_unchanged_file(tmp_path, monkeypatch):
    calls = []
    real = store._file_checksum
    monkeypatch.setattr(store, "_file_checksum", lambda *args: calls.append(1) or real(*args))
    documents = DocumentStore(tmp_path, MODEL)
    path = documents.put(KEY, TENSORS, META).path
    assert documents.get(KEY) is not None and len(calls) == 0  # put hashed what it wrote
    new_process()
    documents.get(KEY)
    documents.get(KEY)
    assert len(calls) == 1
    os.utime(path, ns=(10**18, 10**18))
    documents.get(KEY)
    assert len(calls) == 2


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensors,meta,message",
    [
        ({"x": (np.zeros(3, np.float32), "BF16")}, None, "BF16 needs a numpy uint16 array of bfloat16 bits, got float32"),
        ({"x": (np.zeros(3, np.float16), "BF16")}, None, "BF16 needs a numpy uint16 array of bfloat16 bits, got float16"),
        ({"x": (np.zeros(3, np.uint16), "F16")}, None, "F16 needs a numpy float16 array, got uint16"),
        ({"x": (np.zeros(3, np.float32), "I32")}, None, "I32 needs a numpy int32 array, got float32"),
        ({"x": (np.zeros(3, np.float32), "F8")}, None, "unknown dtype tag 'F8'"),
        ({"x": ([1.0, 2.0], "F32")}, None, "(numpy array, dtype tag)"),
        ({"x": np.zeros(3, np.float32)}, None, "(numpy array, dtype tag)"),
        ({"__metadata__": (np.zeros(3, np.float32), "F32")}, None, "tensor names"),
        ({}, None, "a dict of tensors"),
        ({"x": (np.zeros(3, np.float32), "F32")}, {"model": "other"}, "cannot set the store's own fields: model"),
        ({"x": (np.zeros(3, np.float32), "F32")}, {"n": 3}, "dict of strings"),
    ],
)
def test_put_refuses_bad_tensors_and_meta(any_store, tensors, meta, message):
    one_line_error(lambda: any_store.put(KEY, tensors, meta), message)
    assert any_store.get(KEY) is None


@pytest.mark.parametrize("key", ["../" + KEY[3:], KEY.upper(), KEY[:-1], 12])
def test_keys_must_be_content_keys(any_store, key):
    one_line_error(lambda: any_store.get(key), "32 lowercase hex")


@pytest.mark.parametrize("model", [None, "", "../up", "a/b"])
def test_model_must_be_a_fingerprint(tmp_path, model):
    one_line_error(lambda: DocumentStore(tmp_path, model), "weights fingerprint")
    one_line_error(lambda: MemoryStore(model), "weights fingerprint")


@pytest.mark.parametrize(
    "name,rows,layers,message",
    [
        ("nope", None, None, "has no tensor 'nope'"),
        ("keys", [0, 40], None, "index 40 is out of bounds"),
        ("keys", None, [6], "index 6 is out of bounds"),
        ("keys", [0.5], None, "list of integer indices"),
        ("keys", [[0, 1]], None, "list of integer indices"),
        ("keys", slice(0, 4, 0), None, "slice step cannot be zero"),
        ("positions", None, [0], "too few axes"),
    ],
)
def test_read_refuses_bad_selections(any_store, name, rows, layers, message):
    document = any_store.put(KEY, TENSORS, META)
    one_line_error(lambda: document.read(name, rows=rows, layers=layers), message)
