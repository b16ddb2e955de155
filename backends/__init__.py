"""Backends: the MLX (mlx-lm) and PyTorch (transformers) integrations.

Each module is imported only when asked for, so ``import sagekv`` needs neither library.
"""

from __future__ import annotations

import importlib

from ..errors import SageKVError

BACKENDS = {"mlx": ("mlx", "mlx-lm"), "torch": ("torch", "transformers")}


def get_backend(name: str):
    """The backend module ``sagekv.backends.<name>``, with a one-line error if unavailable."""
    if name not in BACKENDS:
        raise SageKVError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as error:
        needs = " and ".join(BACKENDS[name])
        raise SageKVError(
            f"backend {name!r} needs {needs} ({error}); install them with: pip install 'sagekv[{name}]'"
        ) from None
