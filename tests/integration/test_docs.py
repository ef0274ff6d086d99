"""The README and the documentation pages: their examples run, their links resolve, the README
stays short, they speak of the project only, and the README's headline table is the one the
digits experiment's own files hold.

Convention: a ```python block preceded by the line ``<!-- test: run -->`` runs as written here,
with tiny stand-ins for the names a user brings (``student``, ``teacher``, ``loader``, ``opt``);
other blocks are run by the tests named beside them on their pages, or are fragments.
"""
import functools
import re
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import REPO_ROOT

ROOT = REPO_ROOT
README = ROOT / "README.md"
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))  # the site's generator: which pages its build writes
EXPERIMENT = ROOT / "experiments" / "digits"
MAX_README_LINES = 150


def pages() -> list[Path]:
    """README.md, experiments/*/README.md and every hand-written page under docs/ (not the
    generated or built ones)."""
    found = [README, *sorted((ROOT / "experiments").glob("*/README.md"))]
    for p in sorted(DOCS.rglob("*.md")):
        rel = p.relative_to(DOCS).parts
        if rel[0] not in ("_build", "_generated", "_autosummary"):
            found.append(p)
    return found


def marked_blocks(path: Path) -> list[str]:
    return re.findall(r"<!-- test: run -->\n```python\n(.*?)```", path.read_text(), re.S)


RUNNABLE = [(p, i, code) for p in pages() for i, code in enumerate(marked_blocks(p))]


def _stand_ins() -> dict:
    """A tiny frozen teacher, a student of the same feature width (the README's `KD2MLoss("cw2")`
    has no projector), three batches of 32, and an optimiser."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(96, 6)
    y = teacher(x).argmax(1).detach()
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    return {"student": student, "teacher": teacher, "loader": loader,
            "opt": torch.optim.SGD(student.parameters(), lr=0.05)}


def test_examples_are_marked_to_run():
    names = {p.name for p, _, _ in RUNNABLE}
    assert {"README.md", "integrations.md"} <= names, names


@pytest.mark.parametrize("path,index,code", RUNNABLE, ids=[f"{p.relative_to(ROOT)}[{i}]" for p, i, _ in RUNNABLE])
def test_marked_example_runs_as_written(path, index, code):
    scope = _stand_ins()
    before = [q.detach().clone() for q in scope["student"].parameters()]
    exec(compile(code, str(path.relative_to(ROOT)), "exec"), scope)
    after = list(scope["student"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the example trained nothing"


# ---------------------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """MyST's (GitHub's) anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(2)) for m in re.finditer(r"^(#{1,6}) (.+)$", text, re.M)}


def _links(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        yield m.group(1)


LINKS = [(p, link) for p in pages() for link in _links(p) if not re.match(r"[a-z]+:", link)]


def test_pages_have_links():
    assert len(LINKS) > 40


@pytest.mark.parametrize("path,link", LINKS, ids=[f"{p.relative_to(ROOT)}->{l}" for p, l in LINKS])
def test_relative_link_resolves(path, link):
    target, _, anchor = link.partition("#")
    dest = (path.parent / target).resolve() if target else path
    if DOCS / "_generated" in dest.parents:  # written by the site's build: the generator must name it
        import kd2m_reference
        assert dest.stem in kd2m_reference.PAGES, f"{path.relative_to(ROOT)}: {link}: no generated page {dest.stem}"
        return
    assert dest.exists(), f"{path.relative_to(ROOT)}: {link} names no file"
    assert ROOT in dest.parents or dest == ROOT, f"{link} points outside the repository"
    if anchor:
        assert dest.suffix == ".md", link
        assert anchor in _anchors(dest), f"{path.relative_to(ROOT)}: no heading #{anchor} in {target or path.name}"


# ---------------------------------------------------------------------------- wording
def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= MAX_README_LINES


@pytest.mark.parametrize("path", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_speak_of_the_project_only(path):
    text = path.read_text()
    for pattern in (r"\bsessions?\b", r"\.\./shared", r"/tmp/", r"\bthis round\b", r"\bthe filer\b", r"\bwe tried\b"):
        assert not re.search(pattern, text, re.I), f"{path.relative_to(ROOT)}: {pattern}"


def test_the_paper_is_cited_by_title_authors_and_venue():
    for path in (README, DOCS / "index.md", DOCS / "concepts.md"):
        text = " ".join(path.read_text().split())
        assert "KD²M: An unifying framework for feature knowledge distillation" in text, path
        assert "E. F. Montesuma" in text and "GSI 2025" in text and "2504.01757" in text, path


# ---------------------------------------------------------------------------- results
def test_readme_headline_table_is_the_experiments_summary():
    """Every row of the README's headline table equals the row that kd2m.harness.results renders from
    experiments/digits/summary.csv, and the table shows the teacher, CE and the best students."""
    from kd2m.harness.results import read_summary
    from kd2m.harness.tables import headline_table
    summary = read_summary(EXPERIMENT / "summary.csv")
    text = README.read_text()
    shown = text.split("<!-- headline: experiments/digits/summary.csv", 1)[1]
    table = [line for line in shown.split("\n\n", 1)[0].splitlines() if line.startswith("|")]
    assert table == headline_table(summary, top=3).strip().splitlines()
    best = max((s for s in summary if s["method"] not in ("teacher", "ce")), key=lambda s: s["delta"])
    assert f"| {best['label']} | {best['mean']:.2f} ± {best['std']:.2f} | {best['n']} | {best['delta']:+.2f} [" in text


#: the grids kept as data (each folder holds the grid's results.md) and the benchmarks' folders (tables
#: written by ``benchmarks/*.py --out``, each beside its NAME.env.json)
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").iterdir() if (p / "results.md").is_file())
BENCHMARKS = sorted(p for p in (ROOT / "experiments").iterdir() if p.is_dir() and p not in EXPERIMENTS)


@pytest.mark.parametrize("folder", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_folder_holds_the_tools_files_and_no_weights(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "results.csv", "summary.csv", "results.md", "results.json", "config.json",
            "env.json"} <= names
    assert not [p for p in folder.rglob("*") if p.suffix in (".pt", ".pth")]
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files if p.suffix != ".png") < 500_000
    assert all(p.stat().st_size < 400_000 for p in files if p.suffix == ".png")
    import json
    env = json.loads((folder / "env.json").read_text())
    assert env["cpu_capability"] and env["torch_version"] and env["kd2m_version"]


@pytest.mark.parametrize("folder", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_tables_reproduce_from_its_rows(folder, tmp_path):
    """results.md and summary.csv are what kd2m's own writer makes of the rows in results.json
    (which are results.csv's): no table in an experiment folder was edited by hand."""
    import json

    from kd2m.harness.tables import write_reports
    saved = json.loads((folder / "results.json").read_text())
    write_reports(tmp_path, saved["rows"], saved["dataset"], saved["header"], saved["expected_seeds"],
                  saved["reference"], saved["diverged"])
    assert (tmp_path / "results.md").read_text() == (folder / "results.md").read_text()
    assert (tmp_path / "summary.csv").read_text() == (folder / "summary.csv").read_text()
    import csv
    by_csv = {(r["method"], int(r["seed"])): float(r.get("test_ppl") or r["test_acc"])
              for r in csv.DictReader((folder / "results.csv").open())}
    by_json = {(r["method"], int(r["seed"])): float(r.get("test_ppl") or r["test_acc"]) for r in saved["rows"]}
    # results.csv holds every run of the directory; a grid run again for more seeds of some methods
    # into it (mnist1d-auto) reports the configured seeds only
    assert by_json and by_json.items() <= by_csv.items()


def test_readme_whats_inside_names_every_registered_distance_and_divergence():
    """The README's short table names the registries' distances exactly, and only registered divergences."""
    from kd2m import losses, metrics
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in README.read_text().splitlines()
            if line.startswith("| ") and line.count("|") == 3}
    assert set(re.findall(r"`(\w+)`", rows["distances"])) == set(metrics.available())
    divergences = set(re.findall(r"`(\w+)`", rows["LM divergences"]))
    assert divergences and divergences <= set(losses.available())


@pytest.mark.parametrize("folder", EXPERIMENTS, ids=lambda p: p.name)
def test_intervals_quoted_beside_an_experiment_s_tables_are_the_runs(folder):
    """Every "Δ [low, high]" that the experiment's README quotes is in a table kd2m wrote into that
    folder (results.md, or a `kd2m compare --out` table; minus signs typeset either way)."""
    tables = tool_tables((folder,))
    quoted = INTERVAL.findall((folder / "README.md").read_text())
    assert quoted, folder
    for q in quoted:
        assert q.replace("−", "-") in tables, f"{folder.name}/README.md: {q} is in none of its tables"


INTERVAL = re.compile(r"[+−-]\d+\.\d\d \[[+−-]\d+\.\d\d, [+−-]\d+\.\d\d\]")


@functools.cache
def tool_tables(folders: tuple[Path, ...] = tuple(EXPERIMENTS)) -> str:
    """Every Markdown file the tool wrote into the experiment ``folders`` (results.md, `kd2m compare
    --out`, `kd2m bound`, `kd2m report`, the benchmarks' `--out`), minus signs typeset one way."""
    return "\n".join(p.read_text() for folder in folders for p in sorted(folder.rglob("*.md"))
                     if p.name != "README.md").replace("−", "-")


#: the pages allowed to quote figures that no experiment folder holds: the dated notes of how the λ
#: rule was chosen and of what earlier code measured, which tell what earlier runs gave
HISTORY = tuple(sorted((DOCS / "history").glob("*.md")))


@pytest.mark.parametrize("page", [p for p in pages() if p not in HISTORY and p.parent.parent != ROOT / "experiments"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_intervals_a_page_quotes_are_in_an_experiment_s_tables(page):
    """Every "Δ [low, high]" the README or a page of the site quotes is in a table the tool wrote
    into an experiment folder: no interval is typed from a run the repository does not keep."""
    tables = tool_tables()
    for q in INTERVAL.findall(page.read_text()):
        assert q.replace("−", "-") in tables, f"{page.relative_to(ROOT)}: {q} is in no experiment's tables"


def env_path(table: Path) -> Path:
    """Where ``benchmarks/table_output.py`` keeps the environment of the table at ``table``."""
    from helpers import load_benchmark
    return load_benchmark("table_output").env_path(table)


def benchmark_tables(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.md") if p.name != "README.md")


@pytest.mark.parametrize("folder", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_folder_keeps_each_table_with_the_command_that_wrote_it(folder):
    """Each kept benchmark table has the NAME.env.json its script wrote (benchmarks/table_output.py),
    whose command names a script of this checkout and writes that very file, and the folder's README
    gives that command as it ran."""
    import json
    readme = (folder / "README.md").read_text()
    assert benchmark_tables(folder), folder
    for table in benchmark_tables(folder):
        env = json.loads(env_path(table).read_text())
        command = env["command"].split()
        assert command[0] == "python" and (ROOT / command[1]).is_file() and command[1].startswith("benchmarks/")
        assert command[command.index("--out") + 1] == f"experiments/{folder.name}/{table.name}"
        omp = f"OMP_NUM_THREADS={env['omp_num_threads']} " if env["omp_num_threads"] else ""
        assert omp + env["command"] in readme, f"{folder.name}/README.md does not give {table.name}'s command"
        assert env["cpu_capability"] and env["git_commit"] and env["wall_seconds"] > 0


def table_headers(text: str) -> set[str]:
    """The header row of every Markdown table in ``text`` (the row above a ``|---`` line)."""
    lines = [line.strip() for line in text.splitlines()]
    return {a for a, b in zip(lines, lines[1:]) if a.startswith("|") and b.startswith("|-")}


def test_benchmark_tables_are_shown_from_their_files_never_typed():
    """A page shows a benchmark's table through the site's generated copy of the kept file
    (``_generated/FOLDER_NAME.md``), never typed out, and every kept table is shown somewhere."""
    kept = {p: table_headers(p.read_text()) for folder in BENCHMARKS for p in benchmark_tables(folder)}
    shown = "\n".join(p.read_text() for p in pages())
    for table, headers in kept.items():
        assert f"_generated/{table.parent.name}_{table.stem}.md" in shown, f"{table} is on no page"
        for page in pages():
            if page not in HISTORY:
                typed = headers & table_headers(page.read_text())
                assert not typed, f"{page.relative_to(ROOT)} types a table of {table.relative_to(ROOT)}"


def ratio_cells(text: str) -> set[str]:
    """The cells of every ratio column ("× plain", "ours/POT", "peak ratio", "speed-up", ...) of the
    Markdown tables in ``text``, without their "×"."""
    found: set[str] = set()
    header: list[str] | None = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            header = None
        elif header is None:
            header = cells
        elif not set(line) <= set("|-: "):
            found |= {c.rstrip("×") for h, c in zip(header, cells)
                      if re.search(r"×|ratio|speed-up|ours/POT|model / peak", h)}
    return found


def test_ratios_a_page_quotes_beside_benchmark_tables_are_in_them():
    """A page that shows benchmark tables quotes, in its own words, only ratios ("0.22×") that a ratio
    column of those tables holds: the prose cannot drift from the numbers it reads."""
    checked = 0
    for page in pages():
        text = page.read_text()
        shown = re.findall(r"_generated/([a-z0-9-]+)_([\w-]+)\.md", text)
        kept = [table for folder, name in shown
                if env_path(table := ROOT / "experiments" / folder / f"{name}.md").is_file()]
        if page in HISTORY or not kept:
            continue
        ratios = set().union(*(ratio_cells(p.read_text()) for p in kept))
        for ratio in re.findall(r"(?<![\d.])(\d+\.\d+)×", text):
            assert ratio in ratios, f"{page.relative_to(ROOT)}: {ratio}× is in no ratio column of the tables it shows"
            checked += 1
    assert checked


def test_figures_on_the_site_are_an_experiment_s():
    """Every image a page shows is a file a run wrote into an experiment folder (``kd2m report``),
    so a figure cannot come from another run than the table beside it."""
    shown = [(p, m) for p in pages() for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", p.read_text())]
    assert shown
    for page, target in shown:
        path = (page.parent / target).resolve()
        assert path.is_file(), f"{page.relative_to(ROOT)}: {target} does not exist"
        assert path.is_relative_to(ROOT / "experiments"), f"{page.relative_to(ROOT)}: {target} is no experiment's"


def test_every_source_or_test_file_the_docs_name_exists():
    """A path like `kd2m/harness/grid.py` or `tests/unit/...py` in the README, the docs pages, the
    configs' comments or CONTRIBUTING names a file of this checkout (the how-to's example of a new
    file, `losses/mine.py`, aside)."""
    texts = [README, ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("**/*.md"), *(ROOT / "configs").glob("**/*.yaml")]
    missing = set()
    for path in texts:
        if "_build" in path.parts or "_generated" in path.parts:
            continue
        for found in re.findall(r"(?:src/)?(?:kd2m|tests)/[\w/]+\.py", path.read_text()):
            file = ROOT / found if found.startswith(("src/", "tests/")) else ROOT / "src" / found
            if not file.exists() and not found.endswith("losses/mine.py"):
                missing.add(f"{path.relative_to(ROOT)}: {found}")
    assert sorted(missing) == []
