"""The ``kd2m`` command line: ``run`` (default grid on digits), ``bench`` (a YAML grid), ``report``, ``bound``,
``table``, ``compare``, ``metrics``. This module parses it (:func:`build_parser`) and runs the command's
function of :mod:`kd2m.harness.commands` (:func:`main`).

Every failure the user can fix is printed as one line ``kd2m: error: …`` with exit code 2
(``--debug`` or ``KD2M_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys

from . import rundir as layout  # light: no torch at start-up
from .commands import cmd_bound, cmd_compare, cmd_metrics, cmd_report, cmd_run, cmd_table
from .rundir import FINAL_JSON

__all__ = ["main", "build_parser", "Parser", "one_line", "default_help", "resolved_defaults", "MAX_ERROR_CHARS",
           "NON_NEGATIVE", "RUN_COMMANDS"]


#: Longest error message printed (a hostile input must not become a huge message).
MAX_ERROR_CHARS = 300


#: Integer options that must not be negative (argparse's ``type=int`` takes "-3").
NON_NEGATIVE = {"threads": "0 = torch's default", "num_workers": "0 = load in the main process"}


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters (ending "…" when cut)."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit - 1] + "…"


class Parser(argparse.ArgumentParser):
    """argparse with kd2m's error contract: a bad command line is one ``kd2m: error: …`` line and exit
    code 2 (argparse prints the whole usage block first); ``--help`` is unchanged. Sub-commands
    get this class too (``add_subparsers`` builds them with the parent's class)."""

    def error(self, message: str):
        hint = f" (see {self.prog} --help)"
        self.exit(2, f"kd2m: error: {one_line(message, MAX_ERROR_CHARS - len(hint))}{hint}\n")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """One option per field of RunConfig (its help is on the field, its default is the one a run
    resolves: :func:`default_help`): the CLI cannot drift from the config."""
    import dataclasses

    from .config import RunConfig
    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        if meta.get("flag") and f.default is True:  # on by default: the option turns it off
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                           default=argparse.SUPPRESS, help=meta["help"])
        elif meta.get("flag"):
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=meta["help"])
        else:
            p.add_argument(flag, type=_cli_type(f), default=argparse.SUPPRESS,
                           help=meta["help"] + default_help(f.name))
    p.add_argument("--config", type=str, help="YAML file with the same keys (command-line options override it)")


#: options whose help says their default in words (it is the dataset, or follows from it)
DEFAULT_IN_WORDS = frozenset({"dataset", "task", "out"})


@functools.lru_cache(maxsize=1)
def resolved_defaults() -> dict:
    """{dataset: the RunConfig a run on it resolves with no option given}: the one source of the
    defaults that the options' help states (:func:`default_help`)."""
    from ..data import available_datasets
    from .config import RunConfig
    names = sorted(available_datasets(), key=lambda d: (d != "digits", d != "mnist1d", d))  # the grids' first
    return {d: RunConfig(dataset=d).resolved() for d in names}


def _default_text(value) -> str:
    if isinstance(value, list):
        if value and value == list(range(len(value))):  # seeds 0..n-1: a count
            return str(len(value))
        return ",".join(map(_default_text, value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_help(name: str) -> str:
    """`` (default: V)`` for RunConfig field ``name``, or `` (default by dataset: digits 10;
    mnist1d 60; ...)`` where the datasets' defaults differ (datasets with the same value grouped
    with "/"), as :func:`resolved_defaults` resolves them; "" where no dataset sets it (the help
    says what an unset value means) or the help says it in words."""
    if name in DEFAULT_IN_WORDS:
        return ""
    values = {d: getattr(cfg, name) for d, cfg in resolved_defaults().items()}
    if all(v is None for v in values.values()):
        return ""
    groups: dict[str, list[str]] = {}
    for d, v in values.items():
        groups.setdefault("unset" if v is None else _default_text(v), []).append(d)
    if len(groups) == 1:
        return f" (default: {next(iter(groups))})"
    return " (default by dataset: " + "; ".join(f"{'/'.join(ds)} {v}" for v, ds in groups.items()) + ")"


def _cli_type(f):
    """The command-line parser of a field: numbers as numbers, everything else as text (lists are
    comma lists, seeds a count or a list: RunConfig.resolved() reads them)."""
    hint = str(f.type)
    if hint.startswith("int"):
        return int
    if hint.startswith("float"):
        return float
    return str


#: the commands whose options are RunConfig's fields (building them imports the config, hence torch)
RUN_COMMANDS = ("run", "bench")


def _run_files() -> str:
    """What ``run``/``bench`` write (their --help says it; their last line names the files written)."""
    from .select_k import SELECT_DIR
    return (f"Writes into --out: {layout.RESULTS_CSV} (one row per method × seed), {layout.SUMMARY_CSV} (one row "
            f"per method: paired Δ vs CE), {layout.RESULTS_MD} (the table), {layout.RESULTS_JSON} (the rows and "
            f"summary {layout.RESULTS_MD} was made from), {layout.CONFIG_JSON} (the resolved settings), "
            f"{layout.ENV_JSON} (where it ran: kd2m, commit, CPU, torch and its kernel path, threads), "
            f"{layout.SWEEP_PNG} (with --sweep), {SELECT_DIR}/ (the pilot grid that chooses K of weight auto, when "
            f"it runs) and one directory per run, <method>/seed<seed>/ ({FINAL_JSON}, {layout.MODEL_PT}, "
            f"{layout.LOG_JSONL}).")


#: what ``bound`` and ``report`` write (their --help says it; their last line names the files written)
BOUND_FILES = (f"Writes RUN_DIR/{layout.BOUND_JSON} (every pair, the per-method summary, the settings) and "
               f"RUN_DIR/{layout.BOUND_MD}.")


REPORT_FILES = (f"Writes into RUN_DIR/{layout.REPORT_DIR}/: report.md, accuracy.png, curves.png, diagnostics.png "
                "(when the runs logged diagnostics) and embedding.png (classification, unless --no-embedding).")


def build_parser(run_options: bool = True) -> argparse.ArgumentParser:
    """The ``kd2m`` parser. ``run_options=False`` leaves out the options of ``run``/``bench`` (the
    fields of RunConfig): ``kd2m --help``, ``--version`` and the other commands then parse without
    importing torch."""
    from .. import __version__
    p = Parser(prog="kd2m", description="Knowledge distillation through distribution matching.")
    p.add_argument("--version", action="version", version=f"kd2m {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the default grid (digits unless --dataset: every paper metric and the "
                                     "baselines; `kd2m run --help` gives each option's default)")
    bench = sub.add_parser("bench", help="run a benchmark grid from a YAML config (e.g. configs/paper/cifar10.yaml)")
    bench.add_argument("config_file", nargs="?", help="YAML config")
    if run_options:
        _add_run_options(run)
        _add_run_options(bench)
        run.epilog = bench.epilog = _run_files()
    bench.add_argument("--sweep", type=str, help="KEY=v1,v2,... e.g. weight=1e-7,1e-6,1e-5,1e-4")
    for parser in (run, bench):
        parser.add_argument("--dry-run", action="store_true",
                            help="print the reproduction card (every method's effective settings and where each "
                                 "comes from) and train nothing")
    rep = sub.add_parser("report", help="plots + report.md for a finished run directory", epilog=REPORT_FILES)
    rep.add_argument("run_dir")
    rep.add_argument("--no-embedding", action="store_true", help="skip the t-SNE feature embedding")
    rep.add_argument("--device", default="auto", help="device of the embedding's forward passes: auto, cpu, cuda, "
                                                      "cuda:1 (default: auto)")
    bnd = sub.add_parser("bound", help="evaluate Theorem 1's terms on held-out data for trained pairs",
                         epilog=BOUND_FILES)
    bnd.add_argument("run_dir")
    bnd.add_argument("--samples", type=int, default=1000, help="held-out samples N for exact OT (default 1000)")
    bnd.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default: auto)")
    bnd.add_argument("--data-root", default=None, help="where the dataset lives (default: the run's data_root)")
    tab = sub.add_parser("table", help="the paper's table over several run directories (datasets as columns)")
    tab.add_argument("run_dirs", nargs="+")
    tab.add_argument("--out", help="also write the Markdown table to this file (it writes nothing else)")
    cmp_ = sub.add_parser("compare", help="paired Δ between methods of one run directory (e.g. weight auto vs swept λ)")
    cmp_.add_argument("run_dir")
    cmp_.add_argument("pairs", nargs="*", help="A:B pairs of method keys (Δ = A − B)")
    cmp_.add_argument("--suffix", help="compare every method KEY+SUFFIX with KEY, e.g. --suffix '@auto*1'")
    cmp_.add_argument("--out", help="also write the Markdown table to this file (it writes nothing else)")
    met = sub.add_parser("metrics", help="list metrics, models and datasets")
    met.add_argument("--models", action="store_true")
    return p


def _on_sigterm(signum, frame):
    raise SystemExit(143)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse's types cannot say: option values that are never valid."""
    for key, meaning in NON_NEGATIVE.items():
        value = getattr(args, key, None)
        if value is not None and value < 0:
            parser.exit(2, f"kd2m: error: argument --{key.replace('_', '-')}: must be ≥ 0 ({meaning}), got {value} "
                           f"(see kd2m {args.command} --help)\n")


def _command_of(argv: list[str]) -> str | None:
    """The command a command line names (its first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(run_options=_command_of(argv) in RUN_COMMANDS)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    debug = args.debug or os.environ.get("KD2M_DEBUG") == "1"
    # restored on the way out: a caller in the same process (a notebook, pytest) keeps its own SIGTERM handling
    previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    handler = {"run": cmd_run, "bench": cmd_run, "report": cmd_report, "bound": cmd_bound,
               "table": cmd_table, "compare": cmd_compare, "metrics": cmd_metrics}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("kd2m: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except SystemExit as e:
        if e.code == 143:
            print("kd2m: terminated; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        raise
    except Exception as e:  # noqa: BLE001 — one readable line for every user-fixable failure
        if debug:
            raise
        if _out_of_memory(e):
            print(f"kd2m: error: out of memory ({one_line(f'{type(e).__name__}: {e}', 120)}); use a smaller "
                  "--batch-size (O(n²) metrics: also a lower --max-pairwise-mb, or a linear-memory metric such as "
                  "sliced_w2 or gauss_w2)", file=sys.stderr)
            return 2
        msg = one_line(str(e)) or type(e).__name__
        print(f"kd2m: error: {msg}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, TypeError, OSError, KeyError)) else 1
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def _out_of_memory(err: BaseException) -> bool:
    """Python's MemoryError, or torch's (CUDA/MPS) OutOfMemoryError (a RuntimeError: no torch import needed)."""
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"


if __name__ == "__main__":
    sys.exit(main())
