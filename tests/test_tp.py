"""Tensor parallelism through transformers' tp_plan="auto": two gloo processes on the CPU generate what one
process does (scripts/bench_tp.py starts both with torchrun); the 2-GPU run is in tests/test_gpu.py."""

import json

import pytest

import sagekv
from conftest import needs_torch, run_script


@needs_torch
def test_two_processes_sharded_by_heads_give_one_process_tokens(tmp_path):
    report = tmp_path / "tp.json"
    done = run_script("bench_tp.py", "--device", "cpu", "--gpus", "2", "--length", "300", "--budget", "64",
                      "--max-tokens", "10", "--json", str(report))
    assert done.returncode == 0, done.stderr + done.stdout
    one, sharded = json.loads(report.read_text())["runs"]
    assert (one["processes"], sharded["processes"]) == (1, 2)
    assert [r["policy"] for r in sharded["rows"]] == ["full", "sagekv_kv_follow", "sagekv", "streaming", "snapkv"]
    for a, b in zip(one["rows"], sharded["rows"]):
        assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 10, a["policy"]
        assert b["kept_kv_bytes"] * 2 == a["kept_kv_bytes"]  # each process holds its own KV heads
    assert done.stdout.count("| yes |") == 5


@needs_torch
def test_tensor_parallel_outside_torchrun_is_one_line(tiny_checkpoints, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(sagekv.SageKVError, match="processes torchrun starts"):
        sagekv.load(tiny_checkpoints["llama"], backend="torch", tensor_parallel=True)
    with pytest.raises(sagekv.SageKVError, match="needs the torch backend"):
        sagekv.load(tiny_checkpoints["llama"], backend="mlx", tensor_parallel=True)
