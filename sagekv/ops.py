"""The few array operations that differ between numpy, MLX and torch.

Everything else the core needs (``@``, indexing, ``reshape``, ``swapaxes``, ``sum``, and the
functions of ``ops.xp``, the library's own namespace) is spelled the same in all three. The
backends define the MLX and torch versions; :func:`ops_for` picks one from an array's type
without importing a library it was not given.
"""

from __future__ import annotations

import numpy as np


class NumpyOps:
    name = "numpy"
    xp = np  # maximum, minimum, sqrt: spelled the same in numpy, MLX and torch

    @staticmethod
    def float32(x):
        return x if x.dtype == np.float64 else x.astype(np.float32)

    @staticmethod
    def arange(start, stop, like):
        return np.arange(start, stop, dtype=np.int64)

    @staticmethod
    def concat(xs, axis):
        return np.concatenate(xs, axis=axis)

    @staticmethod
    def broadcast_rows(x, rows):
        return np.broadcast_to(x, (rows, x.shape[-1])).copy()

    @staticmethod
    def topk_indices(x, k):
        """Indices of the k largest entries along the last axis, in no particular order."""
        return np.argpartition(-x, k - 1, axis=-1)[..., :k]

    @staticmethod
    def sort(x):
        return np.sort(x, axis=-1)

    @staticmethod
    def full(shape, value, like):
        return np.full(shape, value, dtype=like.dtype)

    @staticmethod
    def asarray(x, like):
        return np.asarray(x)

    @staticmethod
    def cumsum(x, axis):
        return np.cumsum(x, axis=axis)

    @staticmethod
    def round(x, decimals):
        return np.round(x, decimals)

    @staticmethod
    def reduce_max(x, axis):
        return x.max(axis=axis)

    @staticmethod
    def reduce_min(x, axis):
        return x.min(axis=axis)

    @staticmethod
    def softmax(x):
        """Softmax over the last axis, computed in (at least) float32."""
        x = NumpyOps.float32(x)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    @staticmethod
    def attention(q, k, v, scale, mask=None):
        """Grouped-query attention of q [1, Hq, L, D] over k, v [1, Hkv, T, D]; ``mask`` [L, T]
        (True: attend), "causal" (L == T) or None for all of them."""
        b, hq, length, d = q.shape
        hkv = k.shape[1]
        logits = (q.reshape(b, hkv, hq // hkv, length, d) @ k[:, :, None].swapaxes(-1, -2)) * scale
        if isinstance(mask, str):
            mask = np.tril(np.ones((length, k.shape[2]), bool))
        if mask is not None:
            logits = np.where(mask, logits, -np.inf)
        out = NumpyOps.softmax(logits).astype(v.dtype) @ v[:, :, None]
        return out.reshape(b, hq, length, d).astype(q.dtype)

    @staticmethod
    def astype_like(x, like):
        return x.astype(like.dtype)

    @staticmethod
    def to_numpy(x):
        return np.asarray(x)

    @staticmethod
    def nbytes(x):
        return int(x.nbytes)


def ops_for(array):
    """The ops of the library that ``array`` belongs to."""
    module = type(array).__module__.split(".")[0]
    if module == "numpy":
        return NumpyOps
    if module == "mlx":
        from .backends.mlx import MlxOps

        return MlxOps
    if module == "torch":
        from .backends.torch import TorchOps

        return TorchOps
    raise TypeError(f"expected a numpy, MLX or torch array, got {type(array).__name__}")
