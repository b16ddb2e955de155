import importlib.util
import os
import re
import subprocess
import sys

# float32 parity needs full-precision matmuls; MLX's CUDA/M5 default is TF32 (read at import).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import numpy as np
import pytest

HAVE_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args, timeout=600):
    """scripts/NAME run with this checkout's sagekv, not an installed copy of another checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def byte_tokens(text: str) -> list:
    """The reference model's tokenization: <s>, then one id per byte."""
    return [256] + list(text.encode())


def word_tokens(text: str) -> list:
    """A stand-in for a BPE tokenizer: a token per word or punctuation mark (about 5 bytes on English)."""
    return [0] + re.findall(r"\w+|[^\w\s]", text)


def one_line_error(call, *texts) -> str:
    """The message of the SageKVError that ``call`` raises: one line holding each of ``texts``."""
    from sagekv.errors import SageKVError

    with pytest.raises(SageKVError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for text in texts:
        assert text in message, message
    return message


class DiskFills:
    """A file that takes ``room`` bytes, then fails as a full disk (or is interrupted)."""

    def __init__(self, file, room, failure):
        self.file, self.room, self.failure = file, room, failure

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.file.write(data[: self.room])
            raise self.failure
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)


needs_mlx = pytest.mark.skipif(not HAVE_MLX, reason="mlx and mlx-lm are not installed")
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch and transformers are not installed")


def to_library(array, library):
    """The same values as a numpy, MLX or torch array."""
    if library == "numpy":
        return array
    if library == "mlx":
        if not HAVE_MLX:
            pytest.skip("mlx is not installed")
        import mlx.core as mx

        return mx.array(array)
    if not HAVE_TORCH:
        pytest.skip("torch is not installed")
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(array):
    """As numpy; half-precision floats come back as float32 (numpy has no bfloat16)."""
    if type(array).__module__.startswith("mlx"):
        import mlx.core as mx

        return np.array(array.astype(mx.float32) if array.dtype in (mx.bfloat16, mx.float16) else array)
    if type(array).__module__.startswith("torch"):
        import torch

        half = array.dtype in (torch.bfloat16, torch.float16)
        return (array.float() if half else array).detach().cpu().numpy()
    array = np.asarray(array)
    return array.astype(np.float32) if array.dtype == np.float16 else array


LIBRARIES = ["numpy", "mlx", "torch"]


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Tiny random checkpoints of each family, saved with transformers' save_pretrained."""
    pytest.importorskip("transformers")
    from sagekv.checkpoints import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_checkpoint(root / family, family, seed=3) for family in FAMILIES}


def model_loader(checkpoints: dict):
    """get(name, backend): the checkpoint ``checkpoints[name]`` loaded once, float32 on the CPU."""
    import sagekv

    loaded = {}

    def get(name, backend):
        pytest.importorskip("mlx_lm" if backend == "mlx" else "torch")
        if (name, backend) not in loaded:
            loaded[name, backend] = sagekv.load(checkpoints[name], backend=backend, device="cpu", dtype="float32")
        return loaded[name, backend]

    return get


@pytest.fixture(scope="session")
def tiny_models(tiny_checkpoints):
    """tiny_models(family, backend): the checkpoint loaded once per session."""
    return model_loader(tiny_checkpoints)
