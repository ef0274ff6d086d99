"""The command line says what it is and what it does: ``kd2m --version``, help that states each
option's default as a run resolves it, the files each command writes named in its help and its
last printout, and ``kd2m --help``/``--version``/a bad command line without loading torch."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kd2m
from kd2m.harness.cli import main

from helpers import REPO_ROOT

ROOT = REPO_ROOT


def run_python(code: str) -> str:
    """stdout of ``python -c code`` in a fresh interpreter (this one has torch loaded already)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


LIGHT = """
import contextlib, io, json, sys
import kd2m.harness.cli
out, err = io.StringIO(), io.StringIO()
try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = kd2m.harness.cli.main({argv!r})
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "out": out.getvalue(), "err": err.getvalue(),
                  "heavy": sorted(m for m in ("torch", "ot") if m in sys.modules)}}))
"""


@pytest.mark.parametrize("argv, code", [(["--version"], 0), (["--help"], 0), (["frob"], 2), (["table"], 2)],
                         ids=["version", "help", "unknown-command", "missing-argument"])
def test_version_help_and_argument_errors_do_not_load_torch(argv, code):
    got = json.loads(run_python(LIGHT.format(argv=argv)))
    assert got["code"] == code and got["heavy"] == []
    if argv == ["--version"]:
        assert got["out"] == f"kd2m {kd2m.__version__}\n"
    if code == 2:
        assert got["err"].startswith("kd2m: error: ") and got["err"].count("\n") == 1


def test_the_version_has_one_home():
    """pyproject.toml reads the version from kd2m.__version__ instead of repeating it."""
    from setuptools.config.pyprojecttoml import read_configuration
    project = read_configuration(ROOT / "pyproject.toml")["project"]
    assert project["version"] == kd2m.__version__
    assert "version" in project.get("dynamic", [])
    text = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'^version\s*=\s*"', text, re.MULTILINE)       # no second copy of the number
    assert re.search(r'^version\s*=\s*\{\s*attr\s*=\s*"kd2m.__version__"', text, re.MULTILINE)


def test_import_kd2m_reaches_every_submodule_lazily():
    out = run_python("import sys, kd2m\n"
                     "light = 'torch' not in sys.modules\n"
                     "term = kd2m.losses.get('dkd')\n"
                     "print(light, type(term).__name__, kd2m.KD2MLoss.__name__, callable(kd2m.metrics.get))")
    assert out.split() == ["True", "FunctionTerm", "KD2MLoss", "True"]


# ------------------------------------------------------------------ defaults stated as resolved
def option_help(text: str) -> dict[str, str]:
    """{"--epochs": its help text, ...} of an argparse help page (lines joined)."""
    helps, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (--[\w-]+)(?: [A-Z_]+)?(?:\s{2,}(.*))?$", line)
        if m:
            name = m.group(1)
            helps[name] = m.group(2) or ""
        elif name and line.startswith(" " * 6):
            helps[name] += " " + line.strip()
        else:
            name = None
    return {k: " ".join(v.split()) for k, v in helps.items()}


def stated_defaults(help_text: str, datasets: list[str]) -> dict[str, str] | None:
    """{dataset: the default the help states for it}, or None when it states none."""
    m = re.search(r"\(default: ([^()]*)\)$", help_text)
    if m:
        return {d: m.group(1) for d in datasets}
    m = re.search(r"\(default by dataset: (.*)\)$", help_text)
    if not m:
        return None
    out = {}
    for group in m.group(1).split("; "):
        names, _, value = group.partition(" ")
        out.update({d: value for d in names.split("/")})
    return out


def as_stated(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        if value and value == list(range(len(value))):   # seeds 0..n-1: stated as a count
            return str(len(value))
        return ",".join(map(as_stated, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize("command", ["run", "bench"])
def test_help_states_the_defaults_a_run_resolves(command, capsys, monkeypatch):
    """`kd2m run --help` stated no default for --epochs, --seeds or --lr, `--parallel` said "1
    otherwise" where a text grid runs 2, and `kd2m --help` said the default grid has 3 seeds (it
    has 10)."""
    import dataclasses

    from kd2m.data import available_datasets
    from kd2m.harness.config import RunConfig
    monkeypatch.setenv("COLUMNS", "2000")          # one line per option: nothing wrapped
    with pytest.raises(SystemExit):
        main([command, "--help"])
    helps = option_help(capsys.readouterr().out)
    datasets = available_datasets()
    resolved = {d: RunConfig(dataset=d).resolved() for d in datasets}
    checked = set()
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        if flag not in helps:
            continue
        stated = stated_defaults(helps[flag], datasets)
        if stated is None or all(getattr(resolved[d], f.name) is None for d in datasets):
            continue  # no default, or the default of an unset value said in words ("bytes, a 257-token ...")
        assert stated == {d: as_stated(getattr(resolved[d], f.name)) for d in datasets}, flag
        checked.add(flag)
    must = {"--epochs", "--seeds", "--lr", "--parallel", "--batch-size", "--teacher-epochs", "--optimizer",
            "--teacher", "--student", "--weight", "--threads", "--baselines"}
    assert must <= checked, must - checked
    assert stated_defaults(helps["--parallel"], datasets)["python_docs"] == "2"
    assert stated_defaults(helps["--seeds"], datasets)["digits"] == "10"
    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    for n in re.findall(r"(\d+) seeds", top):      # a count it states is the one the default grid runs
        assert int(n) == len(resolved["digits"].seeds)


# ------------------------------------------------------------------ every file written is named
@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """A one-seed digits grid of one epoch: the teacher, CE and W2."""
    out = tmp_path_factory.mktemp("grid") / "out"
    capture = subprocess.run(
        [sys.executable, "-m", "kd2m", "run", "--out", str(out), "--epochs", "1", "--teacher-epochs", "1",
         "--seeds", "1", "--metrics", "w2", "--baselines", "ce", "--no-progress", "--no-diagnostics",
         "--parallel", "1", "--select-k", "none"], capture_output=True, text=True, timeout=600, check=False)
    assert capture.returncode == 0, capture.stderr
    return out, capture.stdout


def written(root: Path, before: set = frozenset()) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")} - before


def test_run_names_every_file_it_writes(tiny_grid, capsys):
    out, printed = tiny_grid
    last = printed.strip().splitlines()[-1]
    files = written(out)
    top = {p for p in files if len(p.parts) == 1}
    assert {p.name for p in top} >= {"results.csv", "summary.csv", "results.md", "results.json", "config.json"}
    for p in top:
        assert str(out / p) in last, p                  # results.json was not named
    for name in {p.name for p in files if len(p.parts) > 1}:
        assert name in last, name                       # final.json, model.pt, log.jsonl of each run
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in {p.name for p in files}:
        assert name in help_text, name


def test_bound_and_report_name_every_file_they_write(tiny_grid, capsys):
    out, _ = tiny_grid
    before = written(out)
    assert main(["bound", str(out), "--samples", "50"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    new = written(out, before)
    assert {p.name for p in new} == {"bound.json", "bound.md"}
    for p in new:
        assert str(out / p) in last, p                  # bound.md was not named
    before = written(out)
    assert main(["report", str(out), "--no-embedding"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    new = written(out, before)
    assert {p.name for p in new} >= {"report.md", "accuracy.png", "curves.png"}
    for p in new:
        assert p.name in last, p
    for command, names in (("bound", {"bound.json", "bound.md"}), ("report", {p.name for p in new})):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        for name in names:
            assert name in help_text, (command, name)
