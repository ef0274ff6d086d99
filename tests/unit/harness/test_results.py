"""Results tables: mean ± sample std over seeds, best student in bold, the paper's layout."""
import math
import statistics

import pytest

from kd2m.harness import paired, tables
from kd2m.harness import results as R
from kd2m.harness.cli import main


def rows(dataset, accs):
    return [{"dataset": dataset, "method": m, "seed": s, "test_acc": a, "weight": 0.0}
            for m, per_seed in accs.items() for s, a in enumerate(per_seed)]


def test_summary_is_mean_and_sample_std_in_percent():
    stats = {s["method"]: s for s in paired.summarize(rows("x", {"ce": [0.90, 0.92, 0.97]}))}
    assert stats["ce"]["mean"] == pytest.approx(93.0)
    assert stats["ce"]["std"] == pytest.approx(statistics.stdev([90.0, 92.0, 97.0]))


def test_paper_table_has_datasets_as_columns_and_bold_best_student():
    runs = {"cifar10": rows("cifar10", {"teacher": [0.99, 0.99], "ce": [0.80, 0.82], "cw2": [0.85, 0.87]}),
            "svhn": rows("svhn", {"teacher": [0.97, 0.97], "ce": [0.93, 0.95], "cw2": [0.90, 0.92]})}
    table = tables.paper_table(runs)
    lines = table.strip().splitlines()
    assert lines[0] == ("| method | cifar10 (ours): test accuracy (%) | svhn (ours): test accuracy (%) | "
                        "cifar10 (paper): test accuracy (%) | svhn (paper): test accuracy (%) |")
    by = {ln.split("|")[1].strip(): ln for ln in lines[2:]}
    assert list(by) == ["teacher", "student (CE only)", "CW2 (E)"]  # the paper's row order
    assert "**86.00 ± 1.41**" in by["CW2 (E)"] and "**94.00 ± 1.41**" in by["student (CE only)"]
    assert "99.00 ± 0.00" in by["teacher"] and "**" not in by["teacher"]
    assert by["CW2 (E)"].rstrip(" |").endswith("86.54 | 94.06")  # the paper's published numbers


def test_table_command_reads_run_directories(tmp_path, capsys):
    for ds in ("cifar10", "svhn"):
        d = tmp_path / ds
        d.mkdir()
        R.write_rows(d / "results.csv", rows(ds, {"ce": [0.8, 0.9], "w2": [0.85, 0.95]}))
    out = tmp_path / "table.md"
    assert main(["table", str(tmp_path / "cifar10"), str(tmp_path / "svhn"), "--out", str(out)]) == 0
    assert "| W2 (E) | **90.00 ± 7.07** | **90.00 ± 7.07** | 86.45 | 94.00 |" in out.read_text()
    assert main(["table", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kd2m: error:") and "missing/results.csv does not exist" in err


def test_results_json_holds_numbers_and_valid_json(tmp_path):
    """Rows read back from results.csv had epochs and seconds as strings in results.json, and the std of
    a single seed was written as NaN (not JSON)."""
    import json
    row = {"dataset": "digits", "method": "cw2", "label": "CW2 (E)", "metric": "cw2", "weight": 0.1, "seed": 0,
           "test_acc": 0.9583, "epochs": 10, "seconds": 1.25, "run_dir": "cw2/seed0"}
    R.write_rows(tmp_path / "results.csv", [row, {**row, "method": "teacher", "metric": "", "weight": "",
                                                   "seed": 1}])
    tables.write_reports(tmp_path, R.read_rows(tmp_path / "results.csv"), "digits")
    text = (tmp_path / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert data["rows"][0] == {**row, "best_acc": None, "best_epoch": None}
    assert data["rows"][1]["weight"] == 0.0 and data["rows"][1]["seed"] == 1
    assert data["summary"][0]["std"] is None and data["summary"][0]["mean"] == pytest.approx(95.83)
    with pytest.raises(ValueError, match="epochs 'ten' is not an integer"):
        tables.write_reports(tmp_path, [{**row, "epochs": "ten"}], "digits")


def test_plot_sweep_leaves_the_matplotlib_backend_alone(tmp_path):
    """It called matplotlib.use("Agg"): a notebook's inline backend was switched off by a sweep."""
    import matplotlib
    import matplotlib.pyplot as plt

    from kd2m.harness.plots import plot_sweep
    rows = [{"method": m, "seed": s, "test_acc": a} for s in (0, 1)
            for m, a in (("ce", 0.90), ("cw2@1e-05", 0.91 + s / 100), ("cw2@0.001", 0.93))]
    before = matplotlib.get_backend()
    matplotlib.use("template")  # a backend the plot must not replace
    try:
        plot_sweep(rows, "weight", tmp_path / "sweep.png")
        assert matplotlib.get_backend() == "template"
        assert plt.get_fignums() == []   # no figure left in pyplot's registry either
    finally:
        matplotlib.use(before)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rows(means: dict, deltas: dict, n=6):
    """Rows where method m's accuracy on seed s is means[m] + deltas[m][s] (in %)."""
    return [{"method": m, "seed": s, "test_acc": (mu + deltas.get(m, [0.0] * n)[s]) / 100}
            for m, mu in means.items() for s in range(n)]


def test_the_best_is_bold_only_when_a_paired_interval_separates_it_from_the_runner_up():
    noise = [0.3, -0.2, 0.1, -0.4, 0.2, 0.0]
    clear = _rows({"ce": 90.0, "kd": 91.0, "cw2": 92.0}, {"cw2": noise})      # cw2 − kd: +1 ± small spread
    md = tables.markdown_table(clear, "digits")
    assert "| CW2 (E) | **92.00 ± 0.26** |" in md and "No student is in bold" not in md
    close = _rows({"ce": 90.0, "kd": 91.0, "cw2": 91.05}, {"cw2": noise})      # +0.05: inside the interval
    md = tables.markdown_table(close, "digits")
    assert "**" not in md
    assert "No student is in bold: the best mean, CW2 (E), is not separated from the runner-up, KD" in md


def test_compare_says_how_many_seeds_a_difference_of_that_size_needs():
    from scipy import stats
    d = [0.5, -0.3, 0.8, 0.1, -0.2, 0.6, 0.4, -0.1]
    n = paired.seeds_for_power(d)
    mean, sd = sum(d) / len(d), statistics.stdev(d)

    def enough(k):  # the criterion written out
        return abs(mean) >= (stats.t.ppf(0.975, k - 1) + stats.t.ppf(0.8, k - 1)) * sd / math.sqrt(k)
    assert enough(n) and not enough(n - 1)
    assert paired.seeds_for_power([0.2]) is None and paired.seeds_for_power([0.0, 0.0, 0.0]) is None
    assert paired.seeds_for_power([0.2, 0.2]) == 2
    rows = _rows({"kd": 91.0, "cw2": 91.0}, {"cw2": d, "kd": [0.0] * 8}, n=8)
    text = tables.compare_table(rows, [("cw2", "kd")])
    assert f"needs about {n} seeds for an 80% chance" in text and "(this comparison has 8)" in text
