"""Tables, results.md, the printed table and the report's plots read the figure of the grid's task
(:class:`kd2m.tasks.Task`): its name, unit and direction (accuracy in %, higher is better;
perplexity, lower is better), and bold a best by one rule (:func:`kd2m.harness.paired.best_separated`)."""
import json

import pytest

from kd2m.harness import paired, tables
from kd2m.harness import results as R
from kd2m.harness.cli import main

SEEDS = 4
NOISE = [0.3, -0.2, 0.1, -0.4]


def lm_rows():
    """A language-model grid: FKL's perplexity is the lowest (the best), clearly below JSD's (the
    runner-up) and CE's on every seed; RKL's the highest (the worst), above 100."""
    ppl = {"teacher": 5.0, "ce": 120.0, "fkl": 110.0, "jsd": 118.0, "rkl": 140.0}
    return [{"dataset": "python_docs", "method": m, "label": "", "metric": "", "weight": 0.0, "seed": s,
             "test_acc": 0.3, "test_ppl": p + (NOISE[s] if m in ("fkl", "rkl") else 0.0),
             "run_dir": f"{m}/seed{s}"}
            for m, p in ppl.items() for s in range(SEEDS)]


def digits_close_rows():
    """A digits grid whose best mean, CW2 (G), is not separated from the runner-up, KD."""
    acc = {"teacher": 99.0, "ce": 90.0, "kd": 91.0, "gauss_cw2": 91.1}
    return [{"dataset": "digits", "method": m, "label": "", "metric": "gauss_cw2" if m == "gauss_cw2" else "",
             "weight": 0.0, "seed": s, "test_acc": (a + (NOISE[s] if m == "gauss_cw2" else 0.0)) / 100,
             "run_dir": f"{m}/seed{s}"}
            for m, a in acc.items() for s in range(SEEDS)]


def grid_dir(tmp_path, rows, dataset):
    """A run directory as a grid leaves it (results files and config.json), without training."""
    d = tmp_path / dataset
    d.mkdir()
    R.write_rows(d / "results.csv", rows)
    tables.write_reports(d, rows, dataset, expected_seeds=SEEDS)
    (d / "config.json").write_text(json.dumps({"dataset": dataset, "teacher": "t", "student": "s"}))
    return d


def table_row(text: str, label: str) -> str:
    return next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))


def bold_rows(text: str) -> list[str]:
    return [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| ") and "**" in ln]


def test_table_bolds_the_lowest_perplexity_and_its_columns_name_the_figure(tmp_path, capsys):
    lm = grid_dir(tmp_path, lm_rows(), "python_docs")
    assert main(["table", str(lm)]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert head == "| method | python_docs (ours): test perplexity |"
    assert bold_rows(out) == ["FKL"]                       # the lowest perplexity, not the highest (RKL)
    assert "**109.95 ± 0.31**" in table_row(out, "FKL")
    digits = grid_dir(tmp_path, digits_close_rows(), "digits")
    assert main(["table", str(digits)]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head == "| method | digits (ours): test accuracy (%) |"


def test_report_plots_the_tasks_figure_in_its_direction_without_a_cap_at_100(tmp_path):
    from kd2m.harness.plots import plot_accuracy
    fig = plot_accuracy(lm_rows(), tmp_path / "accuracy.png")
    bars, deltas = fig.axes
    assert bars.get_ylabel() == "test perplexity (lower is better)"
    assert bars.get_ylim()[1] > 140.0                      # RKL's 140 is drawn, not cut off at 100
    assert "perplexity" in deltas.get_ylabel() and "better: below 0" in deltas.get_ylabel()
    assert "accuracy" not in bars.get_ylabel() + deltas.get_ylabel() + bars.get_title() + deltas.get_title()
    fig = plot_accuracy(digits_close_rows(), tmp_path / "accuracy.png")
    assert fig.axes[0].get_ylabel() == "test accuracy (%) (higher is better)"
    assert fig.axes[0].get_ylim()[1] <= 100.0
    assert "accuracy points" in fig.axes[1].get_ylabel() and "better: above 0" in fig.axes[1].get_ylabel()


def test_report_md_of_a_language_model_grid_names_perplexity(tmp_path):
    lm = grid_dir(tmp_path, lm_rows(), "python_docs")
    assert main(["report", str(lm), "--no-embedding"]) == 0
    md = (lm / "report" / "report.md").read_text()
    assert "![test perplexity per method and paired Δ vs CE (lower is better)](accuracy.png)" in md
    assert "Test perplexity (lower is better) and the distillation loss D" in md
    assert "Test accuracy" not in md
    assert "Perplexity: exp of the mean next-token cross-entropy" in md and "lower is better" in md
    assert "Perplexity: exp of the mean next-token cross-entropy" in (lm / "results.md").read_text()
    assert {p.name for p in (lm / "report").iterdir()} == {"report.md", "accuracy.png", "curves.png"}


def _plot_bold(rows, tmp_path) -> list[str]:
    from kd2m.harness.plots import plot_accuracy
    fig = plot_accuracy(rows, tmp_path / "accuracy.png")
    bold = sorted({t.get_text() for ax in fig.axes for t in ax.get_xticklabels() if t.get_fontweight() == "bold"})
    assert ("not separated from the runner-up" in fig.axes[0].get_xlabel()) == (not bold)
    return bold


@pytest.mark.parametrize("which", ["digits_close", "lm"])
def test_every_output_bolds_the_same_row(tmp_path, capsys, monkeypatch, which):
    """`kd2m table` bolded the highest mean whatever separated it, while results.md of the same grid
    said no student is in bold; the report's plot marked nothing."""
    rows, dataset = (digits_close_rows(), "digits") if which == "digits_close" else (lm_rows(), "python_docs")
    want = [] if which == "digits_close" else ["FKL"]
    d = grid_dir(tmp_path, rows, dataset)
    results_md = (d / "results.md").read_text()
    assert main(["table", str(d)]) == 0
    table = capsys.readouterr().out
    assert main(["report", str(d), "--no-embedding"]) == 0
    report_md = (d / "report" / "report.md").read_text()
    import kd2m.harness.grid
    monkeypatch.setattr(kd2m.harness.grid, "run_grid", lambda cfg, sweep=None, log=print: rows)  # the trained grid
    capsys.readouterr()
    assert main(["run", "--dataset", dataset, "--out", str(tmp_path / "run"), "--seeds", str(SEEDS),
                 "--select-k", "none"]) == 0
    printed = capsys.readouterr().out
    for text in (results_md, table, report_md, printed):
        assert bold_rows(text) == want, text
    assert _plot_bold(rows, tmp_path) == want
    if not want:
        why = "No student is in bold: the best mean, CW2 (G), is not separated from the runner-up, KD"
        for text in (results_md, table, report_md, printed):
            assert why in text


# ---------------------------------------------------------------- lower is better, pinned
def test_wins_and_verdicts_of_a_perplexity_grid_count_a_fall_as_better():
    stats = {s["method"]: s for s in paired.summarize(lm_rows())}
    assert stats["fkl"]["delta"] == pytest.approx(-10.05) and stats["fkl"]["wins"] == SEEDS
    assert stats["rkl"]["delta"] == pytest.approx(19.95) and stats["rkl"]["wins"] == 0
    assert paired.verdict(stats["fkl"]) == "better" and paired.verdict(stats["rkl"]) == "worse"
    md = tables.markdown_table(lm_rows(), "python_docs")
    assert table_row(md, "FKL").endswith(f"| {SEEDS}/{SEEDS} | better |")
    assert table_row(md, "RKL").endswith(f"| 0/{SEEDS} | worse |")
    best, note = paired.best_separated(lm_rows())
    assert best == "fkl" and note == ""


def test_the_k_pilot_breaks_a_perplexity_tie_towards_the_smaller_k():
    from kd2m.harness.select_k import choose

    def pilot(ppl: dict, acc: bool = False):
        key = "test_acc" if acc else "test_ppl"
        return [{"dataset": "digits" if acc else "python_docs", "method": "ce" if k == 0 else f"fkl@auto*{k:g}",
                 "seed": s, "test_acc": v if acc else 0.3, **({} if acc else {key: v})}
                for k, v in ppl.items() for s in (100, 101)]
    chosen = choose(pilot({0: 10.0, 1: 9.0, 3: 9.0}), ["fkl"], [0, 1, 3], [100, 101])
    assert chosen["fkl"]["k"] == 1                         # equal perplexity: the smaller K
    chosen = choose(pilot({0: 10.0, 1: 9.0, 3: 12.0}), ["fkl"], [0, 1, 3], [100, 101])
    assert chosen["fkl"]["k"] == 1                         # the lowest perplexity, not the highest
    chosen = choose(pilot({0: 0.5, 1: 0.9, 3: 0.9}, acc=True), ["fkl"], [0, 1, 3], [100, 101])
    assert chosen["fkl"]["k"] == 1                         # equal accuracy: the smaller K too


def test_table_names_a_diverged_run_as_results_md_does(tmp_path, capsys):
    """`kd2m table` printed "cw2 diverged on seeds label, seeds" (it joined the keys of the record)
    and also called that method unfinished."""
    rows = [r for r in digits_close_rows() if not (r["method"] == "gauss_cw2" and r["seed"] == 3)]
    d = tmp_path / "digits"
    d.mkdir()
    tables.write_reports(d, rows, "digits", expected_seeds=SEEDS,
                         diverged={"gauss_cw2": {"label": "CW2 (G)", "seeds": [3]}})
    assert main(["table", str(d)]) == 0
    out = capsys.readouterr().out
    assert "(!) digits: CW2 (G) diverged on seed 3 (left out of its mean)" in out
    assert "unfinished" not in out


def test_a_sweep_of_a_language_model_grid_plots_perplexity(tmp_path):
    """plot_sweep drew test accuracy (token accuracy, in %) under "test accuracy (%)" for a text
    grid, whose figure is perplexity."""
    from kd2m.harness.plots import plot_sweep
    rows = [{"dataset": "python_docs", "method": m, "seed": s, "test_acc": 0.3, "test_ppl": p}
            for s in (0, 1) for m, p in (("ce", 120.0), ("fkl@0.1", 110.0), ("fkl@1", 130.0))]
    ax = plot_sweep(rows, "weight", tmp_path / "sweep.png").axes[0]
    assert ax.get_ylabel() == "test perplexity (lower is better)"
    assert sorted(ax.lines[0].get_ydata()) == [110.0, 130.0]     # the perplexities, not 100 × accuracy
