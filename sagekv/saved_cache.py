"""A prefilled or selected cache saved to one safetensors file and loaded back, on either backend.

A file holds what :class:`sagekv.generate.Prefilled` holds: the prompt's token ids (``ids``),
the last logits (``logits``) and, per layer ``i``, either the whole cache (``layers.i.keys``,
``layers.i.values`` [1, Hkv, N, D] and, until a policy has selected, the last prompt queries
``layers.i.queries`` [Hq, W, D]) or a policy's decode cache, its ``state`` arrays as
``layers.i.<name>``. Its ``__metadata__`` holds the format and version, the model's weights
fingerprint, the dtype, the observed query window, the full cache's bytes, the policy that
selected (if one did), each layer's decode cache ``meta`` as JSON (null for a whole layer) and a
sha256 checksum. Arrays travel through numpy (bfloat16 as its uint16 bits), so a file saved on
one backend loads on the other. Files are written and checked as the document store's are
(:mod:`sagekv.store`).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from .cache import DecodeCache, cache_from_state
from .errors import SageKVError
from .generate import Prefilled
from .store import (NUMPY_DTYPES, Damaged, check_checksum, check_writable, checked_tensors, quoted, read_header, tensor_table,
                    write_file)

FORMAT = "sagekv-cache"
VERSION = "1"


def save_cache(model, prefilled: Prefilled, path) -> str:
    """Write ``prefilled`` (from ``model.prefill``, ``extend``, ``select`` or :func:`load_cache`) to
    ``path`` in one step; returns the absolute path. ``prefilled`` is left as it was."""
    if not isinstance(prefilled, Prefilled) or prefilled.ids is None:
        raise SageKVError("save_cache takes a prompt's cache from model.prefill, extend, select or load_cache, "
                          f"got {type(prefilled).__name__}")
    if prefilled.cache is None:
        raise SageKVError("this prefilled cache was taken over by an earlier call with keep_prefill=False")
    run = model.runner
    tensors = {"ids": (np.asarray(prefilled.ids, np.int64), "I64"), "logits": run.raw(prefilled.logits)}
    layer_metas = []
    for index, layer in enumerate(run.unwrap(prefilled.cache)):
        held = layer.state if isinstance(layer, DecodeCache) else layer
        layer_metas.append(layer.meta if isinstance(layer, DecodeCache) else None)
        tensors.update({f"layers.{index}.{name}": run.raw(array) for name, array in held.items()})
    arrays, tags = checked_tensors(tensors)
    metadata = {
        "format": FORMAT, "version": VERSION, "model": model.store_id, "dtype": model.dtype,
        "observed_queries": str(prefilled.observed_queries), "full_kv_bytes": str(prefilled.full_kv_bytes),
        "layers": json.dumps(layer_metas), **({} if prefilled.selected_by is None else {"selected_by": prefilled.selected_by}),
    }
    path = cache_path(path)
    try:
        write_file(path, arrays, tags, metadata)
    except OSError as error:
        raise SageKVError(f"cannot write cache file {path}: {error.strerror or error}") from None
    return path


def check_save_path(path) -> str:
    """The absolute path, once a file can be written there: checked before a long prefill, not after."""
    path = cache_path(path)
    if os.path.isdir(path):
        raise SageKVError(f"cannot write cache file {path}: it is a directory")
    try:
        check_writable(os.path.dirname(path))
    except OSError as error:
        raise SageKVError(f"cannot write cache file {path}: {error.strerror or error}") from None
    return path


def load_cache(model, path) -> Prefilled:
    """The cache saved in ``path`` as a Prefilled of ``model``'s backend, after checking that the file is
    whole (its checksum) and was saved with the same weights and dtype. Each call reads the file again,
    so every load is a fresh cache."""
    path = cache_path(path)
    start = time.perf_counter()
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            try:
                header, data_start = read_header(file, size)
            except Damaged as error:
                raise SageKVError(f"cache file {path} is not a safetensors file ({error})") from None
            metadata = header["__metadata__"]
            if metadata.get("format") != FORMAT:
                raise SageKVError(f"{path} is not a sagekv cache file (its format is {quoted(metadata.get('format'))})")
            if metadata.get("version") != VERSION:
                raise SageKVError(f"cache file {path} has format version {quoted(metadata.get('version'))}, "
                                  f"this sagekv reads {VERSION!r}; save it again")
            try:
                layout, begins = tensor_table(header, size - data_start)
                check_checksum(file, header, data_start)
            except Damaged as error:
                raise SageKVError(f"cache file {path} is damaged ({error}); save it again") from None
            check_compatible(model, metadata, path)
            arrays = {name: read_tensor(file, data_start + begins[name], *layout[name]) for name in layout}
    except OSError as error:
        raise SageKVError(f"cannot read cache file {path}: {error.strerror or error}") from None
    run = model.runner
    layers = []
    for index, meta in enumerate(json.loads(metadata["layers"])):
        prefix = f"layers.{index}."
        held = {name[len(prefix):]: in_backend(run, array, layout[name][0]) for name, array in arrays.items()
                if name.startswith(prefix)}
        layers.append(held if meta is None else cache_from_state(run.ops, held, meta))
    observed = int(metadata["observed_queries"])
    cache = run.wrap(layers, observed)
    logits = run.from_raw(arrays["logits"], layout["logits"][0])
    run.sync()
    ids = arrays["ids"].tolist()
    return Prefilled(cache, logits, len(ids), int(metadata["full_kv_bytes"]), time.perf_counter() - start, observed, ids,
                     metadata.get("selected_by"))


def check_compatible(model, metadata: dict, path: str) -> None:
    """Refuse a file saved with other weights or in another dtype."""
    if metadata.get("model") != model.store_id:
        raise SageKVError(f"cache file {path} was saved with another model (weights {quoted(metadata.get('model'))}, "
                          f"{model.name}'s are {model.store_id!r})")
    if metadata.get("dtype") != model.dtype:
        raise SageKVError(f"cache file {path} holds {quoted(metadata.get('dtype'))} caches but the model computes in "
                          f"{model.dtype}: load the model with that dtype")


def read_tensor(file, offset: int, tag: str, shape: tuple) -> np.ndarray:
    """One tensor of the open file, as a new (writable) numpy array."""
    file.seek(offset)
    return np.fromfile(file, NUMPY_DTYPES[tag], math.prod(shape)).reshape(shape)


def in_backend(run, array: np.ndarray, tag: str):
    """A file's array on the model's backend; integers (positions, steps) in the backend's index dtype."""
    out = run.from_raw(array, tag)
    return run.ops.astype(out, run.ops.index_dtype) if tag.startswith("I") else out


def cache_path(path) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))
