"""Results tables by hand: the paired Δ-vs-CE markdown and summary.csv, ties, and rows of diverged runs."""
import math

import pytest

from kd2m.harness import paired, tables


def test_a_student_diverging_on_every_seed_gets_a_row_saying_so():
    rows = [{"method": "ce", "label": "student (CE only)", "seed": s, "test_acc": 0.9 + s / 100} for s in range(3)]
    md = tables.markdown_table(rows, "digits", expected_seeds=3, diverged={"w2@auto*10": {"label": "W2 (E) λ=auto*10", "seeds": [0, 1, 2]}})
    assert "| W2 (E) λ=auto*10 | diverged | 0 (!) |" in md
    assert "W2 (E) λ=auto*10 on seeds 0, 1, 2" in md


def test_a_diverged_note_is_attached_to_its_own_row():
    from kd2m.harness import tables
    rows = [{"method": m, "label": lab, "seed": s, "test_acc": 0.9}
            for m, lab in (("ce", "student (CE only)"), ("cw2_a", "CW2 (E) [cw2_a]")) for s in range(2)]
    rows += [{"method": "cw2_b", "label": "CW2 (E) [cw2_b]", "seed": 0, "test_acc": 0.8}]
    md = tables.markdown_table(rows, "digits", expected_seeds=2,
                               diverged={"cw2_b": {"label": "CW2 (E) [cw2_b]", "seeds": [1]}})
    assert "| CW2 (E) [cw2_a] | 90.00 ± 0.00 | 2 |" in md   # tied with CE: no best in bold
    assert "| CW2 (E) [cw2_b] | 80.00 | 1 (!) |" in md and "CW2 (E) [cw2_b] on seed 1" in md


# 5 ---------------------------------------------------------------------------------------------
def test_a_tied_seed_is_not_a_win():
    """Δ = [0, +2, −1] points: one win in three seeds, in summary.csv's numbers and the table."""
    rows = [{"dataset": "x", "method": m, "seed": s, "test_acc": a, "weight": 0.0}
            for m, accs in {"ce": [0.50, 0.50, 0.50], "kd": [0.50, 0.52, 0.49]}.items() for s, a in enumerate(accs)]
    (kd,) = [s for s in paired.summarize(rows) if s["method"] == "kd"]
    assert kd["wins"] == 1 and kd["n_pairs"] == 3
    line = [ln for ln in tables.markdown_table(rows, "x").splitlines() if ln.startswith("| KD |")][0]
    assert "| 1/3 |" in line


def _rows(accs):
    return [{"dataset": "x", "method": m, "seed": s, "test_acc": a, "weight": 0.0}
            for m, per in accs.items() for s, a in enumerate(per)]


def _p(d):
    from scipy import stats
    return stats.ttest_1samp(d, 0.0).pvalue


def test_golden_markdown_table_with_hand_computed_paired_deltas():
    rows = _rows({"teacher": [0.99, 0.99, 0.99], "ce": [0.80, 0.82, 0.81], "cw2": [0.85, 0.86, 0.88],
                  "w2": [0.78, 0.79, 0.79], "gauss_w2": [0.81, 0.81, 0.83]})
    # cw2 − ce per seed: +5, +4, +7 points: mean 5.333…, sd 1.5275…, t(0.975, 2) = 4.302652729911275
    t2 = 4.302652729911275
    d = [5.0, 4.0, 7.0]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    lo, hi = mean - t2 * sd / math.sqrt(3), mean + t2 * sd / math.sqrt(3)
    table = tables.markdown_table(rows, "x")
    lines = {ln.split("|")[1].strip(): ln for ln in table.splitlines()[2:] if ln.startswith("|")}
    assert list(lines) == ["teacher", "student (CE only)", "W2 (E)", "CW2 (E)", "W2 (G)"]
    assert lines["CW2 (E)"] == (f"| CW2 (E) | **86.33 ± 1.53** | 3 | +{mean:.2f} [+{lo:.2f}, +{hi:.2f}] | "
                                f"{_p(d):.3f} | 3/3 | better |")
    # w2 − ce: −2, −3, −2: mean −2.33, sd 0.577, half-width 4.303·0.333 = 1.43: [−3.77, −0.90] excludes 0
    assert lines["W2 (E)"].startswith("| W2 (E) | 78.67 ± 0.58 | 3 | -2.33 [-3.77, -0.90] |")
    assert lines["W2 (E)"].endswith("| 0/3 | worse |")
    # gauss_w2 − ce: +1, −1, +2: the interval straddles 0, no verdict
    assert lines["W2 (G)"].endswith("| 2/3 | — |")
    assert "**" not in lines["teacher"]  # the teacher is never the best student


def test_summary_csv_matches_the_hand_computation(tmp_path):
    rows = _rows({"ce": [0.50, 0.60, 0.55, 0.58], "dkd": [0.52, 0.61, 0.58, 0.57]})
    tables.write_reports(tmp_path, rows, "x")
    import csv
    got = {r["method"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    d = [2.0, 1.0, 3.0, -1.0]
    from scipy import stats
    ci = stats.t.interval(0.95, 3, loc=sum(d) / 4, scale=stats.sem(d))
    assert float(got["dkd"]["delta"]) == pytest.approx(1.25)
    assert float(got["dkd"]["delta_ci_low"]) == pytest.approx(ci[0])
    assert float(got["dkd"]["delta_ci_high"]) == pytest.approx(ci[1])
    assert float(got["dkd"]["p_value"]) == pytest.approx(stats.ttest_rel([52, 61, 58, 57], [50, 60, 55, 58]).pvalue)
    assert got["dkd"]["wins"] == "3" and got["ce"]["delta"] == ""
