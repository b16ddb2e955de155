"""The paper's comparisons computed from hand-made metrics."""

from sagekv.analysis import best_variant, comparisons_markdown, gap_to_full, matching_budget, solved_tasks, task_mean

BUDGETS = [64, 128, 256, 512, 1024, 2048]


def cell(task, length, policy, budget, accuracy):
    return {"task": task, "length": length, "policy": policy, "budget": budget, "accuracy": accuracy, "n": 10}


def grid():
    metrics = []
    for task, offset in (("a", 0.0), ("b", 0.1)):
        metrics.append(cell(task, 2048, "full", None, 0.9 + offset / 2))
        for i, budget in enumerate(BUDGETS):
            metrics.append(cell(task, 2048, "sagekv", budget, min(0.5 + 0.1 * i + offset / 2, 1.0)))
            metrics.append(cell(task, 2048, "sagekv_pool", budget, min(0.6 + 0.1 * i, 1.0)))
            metrics.append(cell(task, 2048, "sagekv_kv", budget, 0.4 + 0.05 * i))
            metrics.append(cell(task, 2048, "sagekv_follow", budget, min(0.7 + 0.1 * i, 1.0)))
            metrics.append(cell(task, 2048, "streaming", budget, 0.3 + 0.1 * i))
            metrics.append(cell(task, 2048, "quest", budget, 0.45 + 0.1 * i))
    return metrics


def test_task_mean_needs_every_task():
    metrics = grid()
    assert abs(task_mean(metrics, "sagekv", 64, 2048) - 0.525) < 1e-12
    assert task_mean(metrics[:-1], "quest", 2048, 2048) is None
    assert task_mean(metrics, "sagekv", 64, 4096) is None


def test_a_task_on_another_haystack_counts_as_another_task():
    metrics = grid() + [dict(m, haystack="pydoc", accuracy=0.0) for m in grid() if m["task"] == "a"]
    assert abs(task_mean(metrics, "sagekv", 64, 2048) - 0.525 * 2 / 3) < 1e-12
    assert solved_tasks(metrics) == ["a", "b"]


def test_gap_at_one_sixteenth():
    (length, budget, ours, full), = gap_to_full(grid(), "sagekv")
    assert (length, budget) == (2048, 128)
    assert abs(ours - 0.625) < 1e-12 and abs(full - 0.925) < 1e-12


def test_matching_budget():
    # streaming at 4B: 64 -> 256 (0.5), sagekv at 64 is 0.525 >= 0.5
    budget, ours, theirs = matching_budget(grid(), "sagekv", "streaming", 4, 2048)
    assert budget == 64 and abs(theirs - 0.5) < 1e-12
    # quest at 2B: 64 -> 128 gives 0.55 > 0.525; 128 -> 256 gives 0.65 > 0.625; 256 -> 512: 0.75 > 0.725 ...
    assert matching_budget(grid(), "sagekv", "quest", 2, 2048) is None
    assert matching_budget(grid(), "sagekv_pool", "quest", 2, 2048)[0] == 64
    zeros = [dict(m, accuracy=0.0) for m in grid() if m["policy"] in ("sagekv", "streaming")]
    assert matching_budget(zeros, "sagekv", "streaming", 4, 2048) is None  # 0 against 0 is no match


def test_best_variant_and_page():
    winner, means = best_variant(grid(), ["sagekv", "sagekv_pool", "sagekv_kv"])
    assert winner == "sagekv_pool" and means["sagekv_pool"] > means["sagekv"] > means["sagekv_kv"]
    page = comparisons_markdown(grid())  # every variant in the metrics competes; sagekv_kv_follow was not run
    assert "| 2048 | 128 | sagekv | 0.625 | 0.925 | -0.300 |" in page
    assert "| 2048 | 128 | sagekv_follow | 0.800 | 0.925 | -0.125 |" in page and "sagekv_kv_follow" not in page
    assert "| 2048 | sagekv | quest x2 | none in the grid | - | - |" in page
    assert "| 2048 | sagekv_follow | streaming x4 | 64 |" in page  # the best variant is compared too
    assert "| 2048 | sagekv_pool | streaming" not in page
    assert "Highest: `sagekv_follow`." in page
    assert comparisons_markdown(grid(), level=3).startswith("### SAGE-KV against full attention")


def test_solved_tasks_are_those_full_attention_answers_at_every_length():
    metrics = grid()  # full attention: task a 0.9, task b 0.95
    assert solved_tasks(metrics) == ["a", "b"] and solved_tasks(metrics, 0.92) == ["b"]
    metrics.append(cell("a", 4096, "full", None, 0.5))  # a fails at one length
    assert solved_tasks(metrics) == ["b"]


def test_results_page_script(tiny_checkpoints, tmp_path):
    from conftest import run_script

    out = run_script("make_results_page.py", "--model", tiny_checkpoints["llama"], "--backend", "torch",
                     "--tasks", "single_needle", "--lengths", "512", "--budgets", "32,64,128", "--samples", "1",
                     "--out", str(tmp_path / "results"))
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "results" / "README.md").read_text()
    assert "## SAGE-KV against full attention at 1/16 of the context" in page
    assert "| 512 | 32 | sagekv |" in page and "## single_needle" in page and "accuracy_vs_budget.png" in page
