"""The array operations the core needs, written once for numpy, MLX and torch.

:class:`Ops` spells each operation through ``xp``, the library's own namespace, where numpy,
MLX and torch agree (``xp.concatenate(xs, axis=...)``, ``xp.where``, ``xp.round``,
``xp.maximum``, ...); everything else the core needs (``@``, indexing, ``reshape``,
``swapaxes``, ``sum``) is spelled the same on the arrays themselves. Each library's subclass
overrides only what truly differs: the backends define the MLX and torch ones, and
:func:`ops_for` picks one from an array's type without importing a library it was not given.
"""

from __future__ import annotations

import numpy as np


class Ops:
    """Operations spelled through ``xp``; used as a class, never instantiated."""

    xp = None  # the library's namespace
    index_dtype = None  # dtype of positions and indices
    # whether a decode step may index with the host's counts (slices): no captured graph must replay it
    host_slots = False

    @classmethod
    def placement(cls, like) -> dict:
        """Keyword arguments that create a new array where ``like`` lives (only torch has devices)."""
        return {}

    @classmethod
    def astype(cls, x, dtype):
        return x.astype(dtype)

    @classmethod
    def astype_like(cls, x, like):
        return cls.astype(x, like.dtype)

    @classmethod
    def float32(cls, x):
        """``x`` in float32, unless it is float64 (then it stays)."""
        return x if x.dtype == cls.xp.float64 else cls.astype(x, cls.xp.float32)

    @classmethod
    def arange(cls, start, stop, like):
        return cls.xp.arange(start, stop, dtype=cls.index_dtype, **cls.placement(like))

    @classmethod
    def full(cls, shape, value, like):
        return cls.xp.full(shape, value, dtype=like.dtype, **cls.placement(like))

    @classmethod
    def asarray(cls, x, like):
        """The numpy array ``x`` in this library, where ``like`` lives."""
        return cls.xp.asarray(x, **cls.placement(like))

    @classmethod
    def concat(cls, xs, axis):
        return cls.xp.concatenate(xs, axis=axis)

    @classmethod
    def broadcast_rows(cls, x, rows):
        """``x`` [n] repeated as ``rows`` rows [rows, n], a new array."""
        return cls.xp.tile(x, (rows, 1))

    @classmethod
    def topk_indices(cls, x, k):
        """Indices of the k largest entries along the last axis, in no particular order."""
        return cls.astype(cls.xp.argpartition(-x, kth=k - 1, axis=-1)[..., :k], cls.index_dtype)

    @classmethod
    def dot_keys(cls, queries, keys):
        """queries [B, Q, D] @ keys [B, N, D] transposed, in float32 (or float64 if either is)."""
        return cls.float32(queries) @ cls.float32(keys).swapaxes(-1, -2)

    @classmethod
    def sort(cls, x):
        """``x`` sorted along the last axis."""
        return cls.xp.sort(x, axis=-1)

    @classmethod
    def round(cls, x, decimals):
        return cls.xp.round(x, decimals=decimals)

    @classmethod
    def reduce_max(cls, x, axis):
        return x.max(axis=axis)

    @classmethod
    def reduce_min(cls, x, axis):
        return x.min(axis=axis)

    @classmethod
    def write(cls, buffer, axis, index, value):
        """Write ``value`` into ``buffer`` in place at the positions in the index array ``index``
        along ``axis``; an array index (not a Python int) keeps the step the same every time."""
        buffer[(slice(None),) * axis + (index,)] = value

    @classmethod
    def write_rows(cls, buffer, index, value):
        """Write ``value`` [B, H, 1, D] into ``buffer`` [B, H, T, D] in place, row b at position ``index[b]``
        along T (an index array, so the step stays the same every time)."""
        buffer[cls.arange(0, buffer.shape[0], like=index), :, index] = value[:, :, 0]

    @classmethod
    def copy(cls, x):
        """A new array of ``x``'s values that shares nothing with it."""
        return cls.xp.array(x)

    @classmethod
    def to_numpy(cls, x):
        return np.asarray(x)

    @classmethod
    def nbytes(cls, x) -> int:
        return int(x.nbytes)


class NumpyOps(Ops):
    """numpy: no softmax or attention of its own, so both are written out here."""

    xp = np
    index_dtype = np.int64

    @classmethod
    def softmax(cls, x):
        """Softmax over the last axis, computed in (at least) float32."""
        x = cls.float32(x)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    @classmethod
    def attention(cls, q, k, v, scale, mask=None):
        """Grouped-query attention of q [1, Hq, L, D] over k, v [1, Hkv, T, D]; ``mask`` [L, T]
        (True: attend), "causal" (query i of L sees keys up to T - L + i: the L queries are the last
        of the T keys) or None for all of them."""
        b, hq, length, d = q.shape
        hkv = k.shape[1]
        logits = (q.reshape(b, hkv, hq // hkv, length, d) @ k[:, :, None].swapaxes(-1, -2)) * scale
        if isinstance(mask, str):
            mask = np.tril(np.ones((length, k.shape[2]), bool), k=k.shape[2] - length)
        if mask is not None:
            logits = np.where(mask, logits, -np.inf)
        out = cls.softmax(logits).astype(v.dtype) @ v[:, :, None]
        return out.reshape(b, hq, length, d).astype(q.dtype)


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
