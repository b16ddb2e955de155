"""Both backends' Runner classes provide every member of the Runner protocol (checked on the
classes, so no model is loaded)."""

import ast
import inspect
import textwrap

import pytest

from sagekv.backend import Runner

METHODS = sorted(name for name, value in vars(Runner).items() if callable(value) and not name.startswith("_"))
ATTRIBUTES = sorted(Runner.__annotations__)


def set_in_init(cls) -> set:
    """Names ``__init__`` assigns on ``self``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    assigned = [target for node in ast.walk(tree) if isinstance(node, ast.Assign) for target in node.targets]
    return {
        node.attr
        for target in assigned
        for node in ast.walk(target)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
    }


def test_protocol_lists_what_generate_uses():
    assert set(ATTRIBUTES) == {"name", "tokenizer", "num_layers", "model_type", "eos_ids", "config", "dtype",
                               "ops", "kv_heads", "head_dim", "fused_causal"}
    assert set(METHODS) == {
        "new_cache", "prefill", "forward", "new_draw", "next_token", "next_tokens", "token_id", "token_ids", "logits_numpy", "compress", "clone_cache", "kv_bytes", "kept", "sync",
        "inference", "empty_kv", "wrap", "unwrap", "set_decoder", "embed", "layer", "head", "evaluate", "free_bytes",
    }


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_runner_provides_every_member(backend):
    runner = pytest.importorskip(f"sagekv.backends.{backend}").Runner
    for name in METHODS:
        method = getattr(runner, name, None)
        assert callable(method), name
        assert list(inspect.signature(method).parameters) == list(inspect.signature(getattr(Runner, name)).parameters), name
    attributes = set(vars(runner)) | set_in_init(runner)
    assert [name for name in ATTRIBUTES if name not in attributes] == []


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_loaded_runner_is_a_runner(tiny_models, backend):
    assert isinstance(tiny_models("llama", backend).runner, Runner)
