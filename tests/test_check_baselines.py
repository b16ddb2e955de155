"""CPU smoke test of scripts/check_baselines.py on a tiny random checkpoint."""

import json

from conftest import run_script


def test_prints_a_table_per_task_and_writes_every_record(tiny_checkpoints, tmp_path):
    out = tmp_path / "baselines.json"
    done = run_script("check_baselines.py", "--model", tiny_checkpoints["llama"], "--backend", "torch", "--device", "cpu",
                      "--length", "600", "--seeds", "2", "--policies", "quest,streaming", "--budgets", "1/8,1,100",
                      "--json", str(out))
    assert done.returncode == 0, done.stderr
    for task in ("single_needle", "multi_key"):
        assert f"## {task}: 601 tokens on average (asked 600), 2 seeds" in done.stdout
    assert "| quest | " in done.stdout and "| streaming: needle in window | " in done.stdout
    assert "streaming 2/2" in done.stdout  # a window of the whole prompt keeps everything
    records = json.load(open(out))["records"]
    assert len(records) == 2 * 2 * (1 + 2 * 3)  # tasks x seeds x (full + policies x budgets)
    absolute = [r for r in records if r["budget"] == "100"]
    assert {r["budget_tokens"] for r in absolute} == {100}
    assert all((r["needle_in_window"] is None) == (r["policy"] != "streaming") for r in records)
