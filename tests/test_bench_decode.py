"""CPU smoke test of scripts/bench_decode.py on the small random shape: the table and its JSON, no timings checked."""

import json

import pytest

from conftest import needs_mlx, needs_torch, run_script

POSITIVE = ["kept_positions", "kept_kv_bytes", "full_kv_bytes", "decode_tok_s", "decode_tok_s_whole", "floor_tok_s", "x_floor",
            "reference_tok_s_at_n", "reference_tok_s_at_kept"]


@pytest.mark.parametrize("backend", [pytest.param("torch", marks=needs_torch), pytest.param("mlx", marks=needs_mlx)])
def test_table_and_json(backend, tmp_path):
    table = tmp_path / "decode.md"
    done = run_script("bench_decode.py", "--backend", backend, "--device", "cpu", "--shape", "small", "--lengths", "256",
                      "--budgets", "32", "--decode-tokens", "6", "--repeats", "1", "--out", str(table))
    assert done.returncode == 0, done.stderr
    assert "| 256 | sagekv_kv_follow | 32 | eager | " in done.stdout and "copy bandwidth" in done.stdout
    assert table.read_text() in done.stdout
    report = json.loads((tmp_path / "decode.json").read_text())
    assert report["device"].startswith("cpu") and report["copy_bandwidth_bytes_per_s"] > 0
    assert [(r["policy"], r["budget"], r["step"]) for r in report["rows"]] == [  # no graphs on the CPU
        ("full", None, "eager"), ("sagekv_kv_follow", 32, "eager"), ("sagekv", 32, "eager"), ("streaming", 32, "eager")]
    for row in report["rows"]:
        assert all(row[key] > 0 for key in POSITIVE), row
        assert row["select_ms"] >= 0 and row["n"] == 256
    full, evicted = report["rows"][0], report["rows"][1:]
    assert full["kept_positions"] == 256 and all(r["kept_positions"] < 64 for r in evicted)


@pytest.mark.parametrize("backend", [pytest.param("torch", marks=needs_torch), pytest.param("mlx", marks=needs_mlx)])
def test_batch_rows(backend, tmp_path):
    done = run_script("bench_decode.py", "--backend", backend, "--device", "cpu", "--shape", "small", "--lengths", "256",
                      "--budgets", "32", "--policies", "sagekv", "--decode-tokens", "6", "--repeats", "1", "--batch", "3",
                      "--json", str(tmp_path / "decode.json"))
    assert done.returncode == 0, done.stderr
    assert "batches of 3 sequences" in done.stdout
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [(r["policy"], r["batch"]) for r in rows] == [("full", 3), ("sagekv", 3)]
    assert all(r[key] > 0 for r in rows for key in POSITIVE)
