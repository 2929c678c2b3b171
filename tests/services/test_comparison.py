"""The sweep's comparison maths on hand-made numbers."""

import math

import pytest

from services.comparison import (
    CellResult,
    best_aliases,
    comparison_csv,
    comparison_markdown,
    mean_curve,
    paired_differences,
    plot_accuracy_memory,
    plot_curves,
    summary_metrics,
    summary_rows,
    t_interval,
)


def test_t_interval_for_three_seeds_uses_two_degrees_of_freedom():
    iv = t_interval([0.01, 0.02, 0.03])
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 0.01
    assert iv.n == 3 and iv.mean == pytest.approx(0.02)
    assert (iv.low, iv.high) == pytest.approx((0.02 - half, 0.02 + half))


def test_t_interval_of_one_value_has_no_spread():
    iv = t_interval([0.5])
    assert iv.mean == 0.5 and math.isnan(iv.low) and math.isnan(iv.high)


def _grid():
    """fedtiny and fedmef at d=0.1 over 3 seeds, plus dense fedavg (the same runs at every grid density)."""
    acc = {"fedtiny": [0.70, 0.72, 0.68], "fedmef": [0.73, 0.74, 0.70], "fedavg": [0.80, 0.81, 0.79]}
    cells = []
    for density in (0.1, 0.2):
        for method, accs in acc.items():
            for seed, a in enumerate(accs):
                a = a + (0.05 if density == 0.2 and method != "fedavg" else 0.0)
                cells.append(CellResult(
                    method, density, seed, a, dense=method == "fedavg",
                    footprint_bytes=int((4 if method == "fedavg" else density * 10) * 2**20),
                    curve=((1, a / 2), (2, a)), prune_drop=0.01 * seed if method == "fedmef" else None,
                ))
    return cells


def test_summary_counts_dense_runs_once_and_averages_over_seeds():
    rows = summary_rows(_grid())
    assert [(r.method, r.density) for r in rows] == [
        ("fedtiny", 0.1), ("fedtiny", 0.2), ("fedmef", 0.1), ("fedmef", 0.2), ("fedavg", 1.0)
    ]
    fedmef = rows[2]
    assert fedmef.accuracies == (0.73, 0.74, 0.70)
    assert fedmef.mean == pytest.approx(0.7233333) and fedmef.std == pytest.approx(0.0208167, abs=1e-6)
    assert fedmef.prune_drop == pytest.approx(0.01) and rows[0].prune_drop is None
    assert fedmef.footprint_mib == pytest.approx(1.0)
    assert rows[-1].accuracies == (0.80, 0.81, 0.79)  # three seeds, not six


def test_paired_differences_pair_by_seed_per_density():
    paired = paired_differences(_grid(), reference="fedtiny")
    assert [(p.method, p.density) for p in paired] == [("fedmef", 0.1), ("fedavg", 0.1), ("fedmef", 0.2),
                                                      ("fedavg", 0.2)]
    fedmef = paired[0]
    assert fedmef.differences == pytest.approx((0.03, 0.02, 0.02))
    expected = t_interval([0.03, 0.02, 0.02])
    assert (fedmef.interval.mean, fedmef.interval.low) == pytest.approx((expected.mean, expected.low))
    # the dense reference point is paired with the sparse reference of the same seed at each density
    assert paired[3].differences == pytest.approx((0.80 - 0.75, 0.81 - 0.77, 0.79 - 0.73))


def test_tables_and_metrics_name_every_row():
    cells = _grid()
    rows, paired = summary_rows(cells), paired_differences(cells, "fedtiny")
    md = comparison_markdown(rows, paired, title="t")
    assert "| fedmef | 0.1 | 3 | 0.7233 ± 0.0208 | 0.7233 | 1.000 | +0.0100 | - |" in md
    assert "| fedmef | 0.1 | 3 | +0.0233 | [" in md
    lines = comparison_csv(rows, paired).splitlines()
    assert len(lines) == 1 + len(rows) + len(paired) and lines[0].startswith("kind,method,reference,density")
    metrics = summary_metrics(rows, paired)
    assert metrics["acc_mean/fedavg/d1"] == pytest.approx(0.80)
    assert metrics["diff_mean/fedmef-fedtiny/d0.1"] == pytest.approx(0.07 / 3)
    assert metrics["diff_ci_low/fedmef-fedtiny/d0.1"] < metrics["diff_mean/fedmef-fedtiny/d0.1"]


def test_the_comparison_uses_the_mean_of_the_last_rounds_and_shows_the_last_beside_it():
    """One round's accuracy is one noisy draw: summary and paired differences compare the mean over the last
    rounds (``mean_last``); the last round's accuracy stays in the table and the metrics."""
    cells = [CellResult("fedtiny", 0.1, s, last, mean_last=mean, mean_rounds=5)
             for s, (last, mean) in enumerate([(0.80, 0.70), (0.60, 0.72)])]
    cells += [CellResult("fedmef", 0.1, s, last, mean_last=mean, mean_rounds=5)
              for s, (last, mean) in enumerate([(0.70, 0.73), (0.70, 0.74)])]
    rows, paired = summary_rows(cells), paired_differences(cells, "fedtiny")
    assert rows[0].accuracies == (0.70, 0.72) and rows[0].last_round == (0.80, 0.60)
    assert paired[0].differences == pytest.approx((0.03, 0.02))  # on the last round alone: -0.10, +0.10
    md = comparison_markdown(rows, paired)
    assert "accuracy, last 5 rounds" in md and "| fedmef | 0.1 | 2 | 0.7350 ± 0.0071 | 0.7000 |" in md
    assert summary_metrics(rows, paired)["acc_last_round/fedtiny/d0.1"] == pytest.approx(0.70)


def test_mean_of_last_reads_the_evaluated_rounds_only():
    from fedmef_core.evaluation import mean_of_last

    history = [{"round": 1, "accuracy": 0.1}, {"round": 2}, {"round": 3, "accuracy": 0.5},
               {"round": 4, "accuracy": 0.6}]
    assert mean_of_last(history, 2) == pytest.approx(0.55)
    assert mean_of_last(history, 10) == pytest.approx(0.4)
    assert mean_of_last([{"round": 1}], 5) is None


def test_mean_curve_keeps_rounds_every_seed_has():
    assert mean_curve([((1, 0.2), (2, 0.4)), ((1, 0.4), (2, 0.6), (3, 0.9))]) == ([1, 2], pytest.approx([0.3, 0.5]))


def test_plots_are_written(tmp_path):
    cells = _grid()
    plot_curves(cells, tmp_path / "curves.png", title="t")
    plot_accuracy_memory(summary_rows(cells), tmp_path / "memory.png")
    assert (tmp_path / "curves.png").stat().st_size > 5000 and (tmp_path / "memory.png").stat().st_size > 5000


def test_aliases_point_at_each_methods_best_cell_and_the_champion_at_the_best_of_all():
    cells = [CellResult("fedtiny", 0.1, 0, 0.70), CellResult("fedmef", 0.1, 0, 0.74),
             CellResult("fedtiny", 0.1, 1, 0.72), CellResult("fedmef", 0.05, 1, 0.74),  # a tie: the first stays
             CellResult("fedavg", 0.1, 0, 0.80, dense=True)]
    best = best_aliases(cells)
    assert list(best) == ["best-fedtiny", "best-fedmef", "best-fedavg", "champion"]
    assert best["best-fedtiny"] is cells[2] and best["best-fedmef"] is cells[1]
    assert best["champion"] is cells[4]
    assert best_aliases([]) == {}



def test_with_device_budgets_the_comparison_shows_participation_and_accuracy_on_each_tiers_data():
    cells = [CellResult(m, 0.1, seed, 0.7, participation=p + 0.1 * seed,
                        tier_accuracy=(("small", small + seed / 100), ("large", 0.8)))
             for m, p, small in (("fedmef", 0.8, 0.75), ("feddst", 0.5, 0.60)) for seed in range(2)]
    rows = summary_rows(cells)
    assert rows[0].participation == pytest.approx(0.85) and rows[1].participation == pytest.approx(0.55)
    assert dict(rows[1].tier_accuracy) == pytest.approx({"small": 0.605, "large": 0.8})
    text = comparison_markdown(rows, [])
    assert "## Devices: participation and accuracy on each tier's data" in text
    assert "| fedmef | 0.1 | 85% | 0.7550 | 0.8000 |" in text and "| feddst | 0.1 | 55% | 0.6050 | 0.8000 |" in text
    assert "Devices" not in comparison_markdown(summary_rows(_grid()), [])  # unlimited devices: no such table


def test_the_csv_parses_as_numbers_and_pairs_by_budget():
    """comparison.csv wrote `np.float64(-0.06...)` (a numpy repr) into its interval columns; with a budget axis each
    (density, budget) is its own row and pair."""
    import csv
    import io

    import numpy as np

    cells = [CellResult(m, 0.1, s, float(np.float64(a + (0.1 if b == 0.5 else 0.0))), budget=b)
             for b in (0.1, 0.5) for s in range(3) for m, a in (("fedtiny", 0.6 + 0.01 * s), ("fedmef", 0.62 + s / 50))]
    rows, paired = summary_rows(cells), paired_differences(cells, "fedtiny")
    assert [(r.method, r.budget) for r in rows] == [("fedtiny", 0.1), ("fedtiny", 0.5), ("fedmef", 0.1),
                                                    ("fedmef", 0.5)]
    assert [(p.method, p.budget, p.interval.n) for p in paired] == [("fedmef", 0.1, 3), ("fedmef", 0.5, 3)]
    table = list(csv.DictReader(io.StringIO(comparison_csv(rows, paired))))
    for row in table:
        for key in ("density", "budget", "value", "ci_low", "ci_high"):
            if row[key]:
                float(row[key])
    assert {row["budget"] for row in table} == {"0.1", "0.5"}
    assert "| fedmef | 0.1 | 0.5 | 3 |" in comparison_markdown(rows, paired)
    assert "acc_mean/fedmef/d0.1/b0.5" in summary_metrics(rows, paired)


def test_paired_rows_carry_a_t_test_p_and_its_holm_adjustment_over_the_table():
    from scipy import stats

    from services.comparison import holm, paired_p_value

    diffs = (0.02, 0.03, 0.01, 0.025)
    assert math.isclose(paired_p_value(diffs), stats.ttest_1samp(diffs, 0.0).pvalue)
    assert math.isnan(paired_p_value((0.1,)))
    # Holm: sorted 0.01, 0.02, 0.04 times 3, 2, 1 -> 0.03, 0.04, 0.04 (kept non-decreasing); nan is left out
    assert holm([0.04, 0.01, math.nan, 0.02]) == pytest.approx([0.04, 0.03, math.nan, 0.04], nan_ok=True)
    paired = paired_differences(_grid(), "fedtiny")
    assert [p.p_holm for p in paired] == pytest.approx(holm([p.p_value for p in paired]))
    assert all(p.p_holm >= p.p_value for p in paired)
