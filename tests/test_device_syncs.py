"""Selection runs on the device without waiting for it: compressing a prefilled torch cache reads no
value back to the host under any policy, and the kept positions of every layer come back in one read.

On a CPU a read back costs nothing, so each is counted where it starts: a tensor's value asked for on
the host (``item``, ``bool``, ``int``, ``tolist``, ``cpu``, ``numpy``, an index taken from a tensor) and
operations whose output size depends on the values (``nonzero``, boolean masks). On CUDA, every one of
them waits until the device has finished all queued work (tests/test_gpu.py checks the same there with
torch's own sync detection).
"""

import collections

import numpy as np
import pytest

import sagekv
from sagekv.policies import NAMED, make_policy
from sagekv.tasks import generate

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
VALUE_SHAPED = {"nonzero", "masked_select", "unique_consecutive", "_unique2", "repeat_interleave", "_local_scalar_dense"}
BUDGET = 48


class ValueShaped(TorchDispatchMode):
    """Counts operations whose output size depends on tensor values, boolean-mask indexing included."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in VALUE_SHAPED:
            self.counts[name] += 1
        elif name.startswith("index") and isinstance(args[1], (list, tuple)):
            if any(i is not None and i.dtype == torch.bool for i in args[1]):
                self.counts["boolean mask"] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch):
    """host_reads(): a context that counts host reads (by kind) while it is open."""

    def counting():
        counts = collections.Counter()
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def read(self, *args, _name=name, _original=original, **kwargs):
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, read)
        return counts

    class Reads:
        def __enter__(self):
            self.counts = counting()
            self.mode = ValueShaped(self.counts)
            self.mode.__enter__()
            return self.counts

        def __exit__(self, *exc):
            self.mode.__exit__(*exc)
            monkeypatch.undo()

    return Reads


def test_every_kind_of_read_is_counted(host_reads):
    x = torch.arange(6.0) - 2
    with host_reads() as counts:
        x.sum().item()
        bool(x[0] > 0)
        x[: x.argmax()]
        x[x > 0]
        torch.nonzero(x)
        x.cpu().numpy()
    assert {"item", "__bool__", "__index__", "boolean mask", "nonzero", "cpu", "numpy"} <= set(counts)


POLICIES = {name: make_policy(name, BUDGET) for name in NAMED}
POLICIES["quest_all_layers"] = sagekv.Quest(64, page=16, dense_layers=0)  # the named one keeps both tiny layers dense


@pytest.mark.parametrize("name", POLICIES)
def test_compress_reads_nothing_back(tiny_models, host_reads, name):
    policy = POLICIES[name]
    model = tiny_models("llama", "torch")
    run = model.runner
    prefilled = model.prefill(model.encode(generate("single_needle", 400, seed=0).prompt), policy.observed_queries)
    cache = prefilled.cache
    with host_reads() as counts:
        run.compress(cache, policy)
    assert dict(counts) == {}
    decoders = [layer.decoder for layer in cache.layers]
    assert all(decoder is None for decoder in decoders) == (name in ("full", "quest"))  # something was built


def test_kept_positions_of_every_layer_are_read_at_once(tiny_models, host_reads):
    model = tiny_models("llama", "torch")
    run = model.runner
    cache = model.prefill(model.encode(generate("single_needle", 400, seed=0).prompt)).cache
    run.compress(cache, sagekv.SageKV(BUDGET))  # per query head: two position arrays per layer
    with host_reads() as counts:
        kept = run.kept(cache)
    assert counts["cpu"] == 1 and len(kept) == run.num_layers == 2
    for positions, layer in zip(kept, cache.layers):
        assert np.array_equal(positions, layer.decoder.kept())
