"""A document store: one safetensors file of named arrays per (model, document).

A file is ``<model weights fingerprint>-<content key>.safetensors`` in the store directory, in
the safetensors format (8-byte little-endian header length, JSON header, raw data), so
``safetensors.safe_open`` reads it too. bfloat16 data, which numpy lacks, travels as uint16
bits tagged "BF16". Its ``__metadata__`` holds the format, version, model, key, a sha256
checksum and the caller's own strings.

A file is checked before use: header structure, model, key, and the checksum, hashed once per
process for each unchanged file. Tensors are read through a read-only memory map, so reading a
few rows of a large tensor reads only those rows.

Writing such a file in one step, and checking its structure and checksum, serve the saved caches
(:mod:`sagekv.saved_cache`) too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .errors import SageKVError

FORMAT = "sagekv-document"
VERSION = "1"
SUFFIX = ".safetensors"
RESERVED_META = ("format", "version", "model", "key", "checksum")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
HASH_CHUNK = 4 << 20

# safetensors dtype tag -> the numpy dtype holding its values (BF16: its bits)
NUMPY_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
KEY_PATTERN = re.compile(r"[0-9a-f]{32}")
MODEL_PATTERN = re.compile(r"[0-9A-Za-z_-]{1,64}")

# (path, size, mtime_ns) of files whose checksum this process has verified
_verified: set = set()


def content_key(ids) -> str:
    """32 hex characters identifying a document by its token ids (sha256 of their int64 little-endian bytes)."""
    array = np.asarray(ids)
    if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "iu":
        raise SageKVError("a document's token ids must be a non-empty list of integers")
    return hashlib.sha256(array.astype("<i8").tobytes()).hexdigest()[:32]


@dataclass(frozen=True, eq=False)
class StoredDocument:
    """One stored document's tensors; ``path`` is None for a MemoryStore document.

    ``meta`` holds the caller's strings given to ``put`` (the store's own fields are not repeated).
    """

    key: str
    meta: dict
    path: Optional[str]
    _layout: dict  # name -> (dtype tag, shape)
    _whole: Callable[[str], np.ndarray] = field(repr=False)  # name -> the whole tensor: a read-only memory map or in-memory array

    @property
    def names(self) -> tuple:
        return tuple(self._layout)

    def shape(self, name: str) -> tuple:
        return self._layout[self._checked_name(name)][1]

    def dtype(self, name: str) -> str:
        """The safetensors dtype tag, e.g. "F32" or "BF16" (read as uint16)."""
        return self._layout[self._checked_name(name)][0]

    def read(self, name: str, rows=None, layers=None) -> np.ndarray:
        """A new array of the tensor's entries ``rows`` along axis 0 and ``layers`` along axis 1.

        Each is None (all), a slice or a list/array of integer indices; only the selected entries
        are read from the file.
        """
        array = self._whole(self._checked_name(name))
        selections = [(rows, "rows"), (layers, "layers")]
        while selections and selections[-1][0] is None:  # nothing to select there (so a 0-d tensor reads whole)
            selections.pop()
        index = [_index(value, what) for value, what in selections]
        if array.ndim < len(index):
            raise SageKVError(f"tensor {name!r} has shape {array.shape}: too few axes to select rows and layers")
        if len(index) == 2 and all(isinstance(i, np.ndarray) for i in index):
            index[0] = index[0][:, None]  # every listed row at every listed layer, not pairs
        try:
            picked = array[(*index, ...)]
        except (IndexError, ValueError) as error:
            raise SageKVError(f"cannot read tensor {name!r} of shape {array.shape}: {error}") from None
        # a fresh array, never a view of the map or of a MemoryStore's array
        return np.array(picked) if np.may_share_memory(picked, array) else np.ascontiguousarray(picked)

    def _checked_name(self, name: str) -> str:
        if name not in self._layout:
            raise SageKVError(f"document {self.key} has no tensor {name!r} (it has: {', '.join(self._layout)})")
        return name


def _index(value, what: str):
    if value is None:
        return slice(None)
    if isinstance(value, slice):
        return value
    index = np.asarray(value)
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise SageKVError(f"{what} must be None, a slice or a list of integer indices, got {value!r}")
    return index.astype(np.intp)


class _Store:
    """What both stores share: checking the model, keys and tensors, and adding only what is missing.

    A store provides ``get(key)`` and ``_add(key, arrays, tags, meta)``.
    """

    def __init__(self, model: str):
        if not isinstance(model, str) or not MODEL_PATTERN.fullmatch(model):
            raise SageKVError(f"a document store needs the model's weights fingerprint (letters, digits, _ or -), got {model!r}")
        self.model = model

    def put(self, key: str, tensors: dict, meta: Optional[dict] = None) -> StoredDocument:
        """Store ``tensors`` (name -> (numpy array, safetensors dtype tag)) with ``meta`` (str -> str) under ``key``.

        A document already stored under ``key`` is returned as it is, without writing.
        """
        key = _checked_key(key)
        arrays, tags = checked_tensors(tensors)
        meta = _checked_meta(meta)
        existing = self.get(key)
        return existing if existing is not None else self._add(key, arrays, tags, meta)


def _checked_key(key) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise SageKVError(f"a document key is 32 lowercase hex characters (see content_key), got {key!r}")
    return key


def checked_tensors(tensors) -> tuple:
    """name -> contiguous little-endian array, and name -> dtype tag."""
    if not isinstance(tensors, dict) or not tensors:
        raise SageKVError("a document needs a dict of tensors: name -> (numpy array, dtype tag)")
    arrays, tags = {}, {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise SageKVError(f"tensor names are non-empty strings other than __metadata__, got {name!r}")
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], np.ndarray)):
            raise SageKVError(f"tensor {name!r} must be given as (numpy array, dtype tag)")
        array, tag = value
        if tag not in NUMPY_DTYPES:
            raise SageKVError(f"tensor {name!r}: unknown dtype tag {tag!r} (known: {', '.join(NUMPY_DTYPES)})")
        expected = NUMPY_DTYPES[tag]
        if (array.dtype.kind, array.dtype.itemsize) != (expected.kind, expected.itemsize):
            bits = " of bfloat16 bits" if tag == "BF16" else ""
            raise SageKVError(f"tensor {name!r}: dtype tag {tag} needs a numpy {expected.name} array{bits}, got {array.dtype}")
        arrays[name], tags[name] = array.astype(expected, order="C", copy=False), tag
    return arrays, tags


def _checked_meta(meta) -> dict:
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SageKVError("document meta must be a dict of strings to strings")
    reserved = sorted(set(meta) & set(RESERVED_META))
    if reserved:
        raise SageKVError(f"document meta cannot set the store's own fields: {', '.join(reserved)}")
    return dict(meta)


class MemoryStore(_Store):
    """Documents held in memory, for callers that run without a store directory."""

    def __init__(self, model: str):
        super().__init__(model)
        self._documents = {}

    def get(self, key: str) -> Optional[StoredDocument]:
        return self._documents.get(_checked_key(key))

    def _add(self, key, arrays, tags, meta) -> StoredDocument:
        owned = {name: np.array(array) for name, array in arrays.items()}  # the caller may change theirs
        for array in owned.values():
            array.flags.writeable = False
        layout = {name: (tags[name], array.shape) for name, array in owned.items()}
        self._documents[key] = StoredDocument(key, meta, None, layout, owned.__getitem__)
        return self._documents[key]


class DocumentStore(_Store):
    """Documents as files in the directory ``root`` (created if missing), for the model ``model``."""

    def __init__(self, root, model: str):
        super().__init__(model)
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise SageKVError(f"document store {self.root} is a file, not a directory")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as error:
            raise SageKVError(f"cannot create document store {self.root}: {error.strerror or error}") from None
        try:
            check_writable(self.root)
        except OSError as error:
            raise SageKVError(f"document store {self.root} is not writable: {error.strerror or error}") from None

    def path(self, key: str) -> str:
        """The file that holds, or would hold, the document ``key``."""
        return os.path.join(self.root, f"{self.model}-{_checked_key(key)}{SUFFIX}")

    def get(self, key: str) -> Optional[StoredDocument]:
        """The stored document, or None if there is none; a damaged or foreign file is refused."""
        path = self.path(key)
        try:
            with open(path, "rb") as file:
                signature = _signature(os.fstat(file.fileno()))
                header, data_start = read_header(file, signature[0])
                layout, begins = tensor_table(header, signature[0] - data_start)
                meta = self._checked_metadata(header["__metadata__"], key, path)
                if (path, *signature) not in _verified:
                    check_checksum(file, header, data_start)
                    _verified.add((path, *signature))
        except FileNotFoundError:
            return None
        except OSError as error:
            raise SageKVError(f"cannot read document file {path}: {error.strerror or error}") from None
        except Damaged as error:
            raise SageKVError(f"document file {path} is damaged ({error}); delete it") from None
        offsets = {name: data_start + begin for name, begin in begins.items()}
        return StoredDocument(key, meta, path, layout, _memory_map(path, signature, layout, offsets))

    def _checked_metadata(self, metadata: dict, key: str, path: str) -> dict:
        """The caller's meta, once the file is known to be this store's document for ``key``."""
        if metadata.get("format") != FORMAT:
            raise SageKVError(f"document file {path} is not a sagekv document; delete it")
        if metadata.get("version") != VERSION:
            raise SageKVError(f"document file {path} has format version {quoted(metadata.get('version'))}, "
                              f"this sagekv writes {VERSION!r}; delete it")
        if metadata.get("model") != self.model:
            raise SageKVError(f"document file {path} belongs to another model (weights {quoted(metadata.get('model'))}, "
                              f"this store's are {self.model!r}); delete it")
        if metadata.get("key") != key:
            raise SageKVError(f"document file {path} holds another document (key {quoted(metadata.get('key'))}); delete it")
        return {name: value for name, value in metadata.items() if name not in RESERVED_META}

    def _add(self, key, arrays, tags, meta) -> StoredDocument:
        path = self.path(key)
        try:
            signature = write_file(path, arrays, tags, {**meta, "format": FORMAT, "version": VERSION, "model": self.model, "key": key})
        except OSError as error:
            raise SageKVError(f"cannot write document file {path}: {error.strerror or error}") from None
        _verified.add((path, *signature))  # these bytes were hashed as they were written
        return self.get(key)


# ---------------------------------------------------------------------------------------------
# Checked safetensors files, shared with sagekv.saved_cache


class Damaged(Exception):
    """Why a file is not a whole, well-formed checked file; the caller names the file and what to do."""


def write_file(path: str, arrays: dict, tags: dict, metadata: dict) -> tuple:
    """Write ``arrays`` (name -> contiguous little-endian array; ``tags``: their safetensors dtypes) and
    ``metadata`` (str -> str) with a sha256 checksum to ``path``, returning the file's signature.

    The file is written beside ``path`` under a temporary name and moved into place in one step, so a
    reader sees the whole file or none; on any failure (an OSError, an interrupt) nothing is left behind.
    """
    header, order = _header(arrays, tags, metadata)
    checksum = _checksum_start(header)
    for name in order:
        checksum.update(arrays[name])
    header["__metadata__"]["checksum"] = checksum.hexdigest()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # padding keeps the data 8-byte aligned, as safetensors does
    file, temporary = _open_temporary(os.path.dirname(path), os.path.basename(path))
    try:
        with file:
            file.write(len(text).to_bytes(8, "little"))
            file.write(text)
            for name in order:
                file.write(arrays[name])
            file.flush()
            os.fsync(file.fileno())
            signature = _signature(os.fstat(file.fileno()))
        os.replace(temporary, path)
    except BaseException:  # disk full, permission, interrupt: leave nothing behind
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return signature


def check_writable(directory: str) -> None:
    """Create and remove a file in ``directory`` (permission bits say nothing for root, as in CI, so try it); OSError if refused."""
    probe, probe_path = _open_temporary(directory, "probe")
    probe.close()
    os.unlink(probe_path)


def check_checksum(file, header: dict, data_start: int) -> None:
    """Raise Damaged unless the file's checksum matches its header and data."""
    expected = header["__metadata__"].get("checksum")
    if expected is None:
        raise Damaged("no checksum")
    if _file_checksum(file, header, data_start) != expected:
        raise Damaged("checksum mismatch")


def _open_temporary(directory: str, name: str) -> tuple:
    """A new hidden file in ``directory`` (file object, path), with the umask's permissions (mkstemp's are owner-only)."""
    path = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb"), path


def _signature(stat) -> tuple:
    return stat.st_size, stat.st_mtime_ns


def _header(arrays: dict, tags: dict, metadata: dict) -> tuple:
    """The safetensors header (tensors in the caller's order) and the order of their data."""
    # widest elements first: with an 8-byte aligned start, every tensor is aligned to its element size
    order = sorted(arrays, key=lambda name: -arrays[name].itemsize)
    begins, offset = {}, 0
    for name in order:
        begins[name], offset = offset, offset + arrays[name].nbytes
    header = {
        name: {"dtype": tags[name], "shape": list(array.shape), "data_offsets": [begins[name], begins[name] + array.nbytes]}
        for name, array in arrays.items()
    }
    header["__metadata__"] = metadata
    return header, order


def _checksum_start(header: dict):
    """sha256 of the header less its checksum, canonically written; the data region is hashed after it."""
    metadata = {name: value for name, value in header["__metadata__"].items() if name != "checksum"}
    canonical = json.dumps({**header, "__metadata__": metadata}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode())


def _file_checksum(file, header: dict, data_start: int) -> str:
    """The checksum of a file whose data region runs from ``data_start`` to its end, read in chunks."""
    checksum = _checksum_start(header)
    buffer = memoryview(bytearray(HASH_CHUNK))
    file.seek(data_start)
    while True:
        count = file.readinto(buffer)
        if not count:
            return checksum.hexdigest()
        checksum.update(buffer[:count])


def quoted(value) -> str:
    """A value read from a file, shown in one short line."""
    return repr(str(value)[:64])


def read_header(file, size: int) -> tuple:
    """The parsed JSON header and where the data region starts."""
    prefix = file.read(8)
    if len(prefix) < 8:
        raise Damaged(f"{size} bytes, shorter than a header")
    length = int.from_bytes(prefix, "little")
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise Damaged(f"header length {length} does not fit in {size} bytes")
    try:
        header = json.loads(file.read(length))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Damaged("header is not valid JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise Damaged("header is not a safetensors header with metadata")
    if not all(isinstance(value, str) for value in header["__metadata__"].values()):
        raise Damaged("metadata values are not all strings")
    return header, 8 + length


def tensor_table(header: dict, data_size: int) -> tuple:
    """name -> (dtype tag, shape) and name -> data offset, once the entries tile the data region exactly."""
    layout, begins, ends = {}, {}, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in NUMPY_DTYPES:
            raise Damaged(f"tensor {name!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise Damaged(f"tensor {name!r} has no valid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
            raise Damaged(f"tensor {name!r} has no valid data offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * NUMPY_DTYPES[entry["dtype"]].itemsize:
            raise Damaged(f"tensor {name!r}: data offsets do not match its shape and dtype")
        layout[name] = (entry["dtype"], tuple(shape))
        begins[name], ends[name] = offsets
    end = 0
    for name in sorted(begins, key=lambda name: (begins[name], ends[name])):
        if begins[name] != end:
            raise Damaged("tensor data overlaps or leaves gaps")
        end = ends[name]
    if end != data_size:
        raise Damaged(f"the tensors take {end} bytes, the file holds {data_size}")
    return layout, begins


def _memory_map(path: str, signature: tuple, layout: dict, offsets: dict) -> Callable[[str], np.ndarray]:
    """name -> the whole tensor as a read-only memory map of the verified file."""

    def whole(name: str) -> np.ndarray:
        tag, shape = layout[name]
        if math.prod(shape) == 0:
            return np.empty(shape, NUMPY_DTYPES[tag])  # an empty map is an error
        try:
            with open(path, "rb") as file:
                if _signature(os.fstat(file.fileno())) != signature:
                    raise SageKVError(f"document file {path} changed since it was checked; get it again")
                return np.memmap(file, dtype=NUMPY_DTYPES[tag], mode="r", offset=offsets[name], shape=shape)
        except OSError as error:
            raise SageKVError(f"cannot read document file {path}: {error.strerror or error}") from None

    return whole
