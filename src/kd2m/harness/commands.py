"""What each ``kd2m`` command does, one function per command (``cmd_run`` serves ``run`` and
``bench``), and the configuration a command line describes (:func:`config_from_args`).

:mod:`kd2m.harness.cli` parses the command line and calls them; an error they raise becomes its
one line ``kd2m: error: …`` there. What they need beyond the run directory's layout is imported
inside them, so that a command loads only its own modules.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from . import rundir as layout  # light: no torch at start-up
from .rundir import FINAL_JSON, RunDir

__all__ = ["config_from_args", "parse_sweep", "cmd_run", "cmd_report", "cmd_bound", "cmd_table", "cmd_compare",
           "cmd_metrics"]


def config_from_args(args: argparse.Namespace, given: set | None = None):
    """The RunConfig of a command line (its YAML file, then its options over it); ``given``, a set,
    receives the names of the fields they set."""
    from .config import RunConfig, from_mapping, given_keys
    from .config_yaml import read_yaml_mapping
    cfg = RunConfig()
    config_file = getattr(args, "config_file", None) or getattr(args, "config", None)
    if getattr(args, "config_file", None) and getattr(args, "config", None):
        raise ValueError("give the YAML config once: positionally or with --config")
    if config_file:
        mapping = read_yaml_mapping(config_file)
        cfg = from_mapping(mapping, cfg, source=str(config_file))
        if given is not None:
            given |= given_keys(mapping)
    overrides = {}
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("cli") is False or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.name in ("seeds", "select_seeds"):  # "3": seeds 0,1,2 (as in YAML); "0": seed 0; "5,7" or "5,": a list
            value = int(value) if value.strip().isdigit() and value.strip() != "0" else value
        overrides[f.name] = value
    if given is not None:
        given |= set(overrides)
    cfg = from_mapping(overrides, cfg, source="command line")
    if "weight" in overrides and cfg.weights:
        # over a config file's `weights` too (else `kd2m bench configs/digits.yaml --weight auto`
        # trains the file's swept λ per distance)
        from .recipes import without_distance_weights
        cfg.weights = without_distance_weights(cfg.weights)
    return cfg


def _selected(cfg, names, values):
    """``cfg`` (resolved) with each term of ``names`` at the K among ``values`` that its pilot grid
    chose (kd2m.harness.select_k: what ``weight: auto`` means in a grid)."""
    from .. import distributed as dist_ctx
    from .select_k import check_reused, check_selection, select_k, with_chosen
    check_selection(cfg, names, values, cfg.select_seeds)
    check_reused(cfg, {n: list(values) for n in names})  # a finished run no candidate K can reuse
    chosen = select_k(cfg, names, values, cfg.select_seeds, log=lambda m: dist_ctx.is_main() and print(m, flush=True))
    check_reused(cfg, {n: [c["k"]] for n, c in chosen.items()}, chosen=True)  # the choice moved off a finished run
    return dataclasses.replace(with_chosen(cfg, chosen), select_k=list(values)).resolved(), chosen


def parse_sweep(text: str | None):
    if not text:
        return None
    key, sep, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not values:
        raise ValueError(f"--sweep expects KEY=v1,v2,..., got {text!r}")
    from .grid import SWEEPABLE
    if key not in SWEEPABLE:
        raise ValueError(f"--sweep supports {', '.join(SWEEPABLE)}; got {key!r}")
    try:
        return key, [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep values must be numbers, got {values!r}") from None


def cmd_run(args) -> int:
    from .. import distributed as dist_ctx
    from .grid import run_grid
    given: set = set()
    cfg = config_from_args(args, given)
    sweep = parse_sweep(getattr(args, "sweep", None))
    if getattr(args, "dry_run", False):
        from .card import reproduction_card
        source = getattr(args, "config_file", None) or getattr(args, "config", None)
        print(reproduction_card(cfg, f"kd2m {args.command}" + (f" {source}" if source else ""), given, sweep),
              end="")
        return 0
    resolved = cfg.resolved()
    from .select_k import SELECT_DIR, auto_terms, plan
    selection, chosen = plan(resolved, sweep), None
    if selection:
        cfg, chosen = _selected(resolved, *selection)
        resolved = cfg
    elif sweep is not None and sweep[0] != "auto_weight" and resolved.select_k is None \
            and auto_terms(resolved, bare_only=True):
        print("kd2m: note: with --sweep, `weight: auto` is auto*1 (one calibration; K is not chosen on a "
              "holdout)", flush=True)
    if dist_ctx.is_main() or not dist_ctx.launched_by_torchrun():
        print(f"kd2m: {resolved.dataset}: teacher {resolved.teacher} → student {resolved.student}; "
              f"methods {', '.join(m.key for m in resolved.methods())}; seeds {resolved.seeds}; "
              f"output {resolved.out}", flush=True)
    try:
        rows = run_grid(cfg, sweep=sweep, log=lambda m: dist_ctx.is_main() and print(m, flush=True))
        if dist_ctx.is_main():
            from .tables import markdown_table, note, reference_numbers
            print()
            print(markdown_table(rows, resolved.dataset, len(resolved.seeds),
                                 reference_numbers(resolved.dataset, resolved.teacher, resolved.student)))
            print(note(rows))
            if chosen:  # the table's rows do not show λ: which K each chosen term trained at
                labels = {m.key: m.label for m in resolved.methods()}
                print("λ chosen on a holdout (select-k/selected.json): " + ", ".join(
                    f"{labels.get(n, n)} auto×{c['k']:g}" + (" (the term off)" if c["k"] == 0 else "")
                    for n, c in chosen.items()) + ".")
            if resolved.holdout:
                print(f"Scored on a holdout of {resolved.holdout:g} of the training split (trained on the rest), "
                      "not on the test split.")
            out = RunDir(resolved.out)
            print(f"results: {out.results_csv} (one row per method × seed), {out.summary_csv} (one row per "
                  f"method, paired Δ vs CE), {out.results_md}, {out.results_json} (the rows and summary of "
                  f"{layout.RESULTS_MD}), {out.config_json}, {out.env_json} (where it ran)"
                  + (f", {out.sweep_png}" if sweep else "")
                  + (f", {out.root / SELECT_DIR}/ (the pilot grid)" if chosen else "")
                  + f"; each run in {out.root}/<method>/seed<seed>/ ({FINAL_JSON}, {layout.MODEL_PT}, {layout.LOG_JSONL})")
    finally:
        dist_ctx.teardown()
    return 0


def cmd_report(args) -> int:
    from .report import make_report
    path = make_report(args.run_dir, embedding=not args.no_embedding, device=args.device)
    pictures = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"report: {path} ({', '.join(pictures)} beside it)")
    return 0


def cmd_bound(args) -> int:
    from .bound import evaluate_run
    table, path = evaluate_run(args.run_dir, samples=args.samples, device=args.device, data_root=args.data_root)
    print(table)
    print(f"bound results: {path}, {RunDir(args.run_dir).bound_md}")
    return 0


def cmd_table(args) -> int:
    from ..atomic_io import atomic_write_text
    from .paired import summarize
    from .results import read_reported
    from .tables import paper_table
    runs, notes = {}, []
    for d in args.run_dirs:
        rows, meta = read_reported(d)  # the rows each results.md was made from
        if not rows:
            raise FileNotFoundError(f"{Path(d) / 'results.csv'} is empty: is {d} a finished kd2m run directory?")
        dataset = rows[0].get("dataset") or Path(d).name
        if dataset in runs:
            raise ValueError(f"two run directories hold dataset {dataset!r}; give one per dataset")
        runs[dataset] = rows
        want = meta.get("expected_seeds")
        diverged = meta.get("diverged") or {}  # {method key: {"label", "seeds"}}, as results.md flags them
        short = [f"{s['label']} {s['n']}/{want}" for s in summarize(rows)
                 if want and s["n"] + len(diverged.get(s["method"], {}).get("seeds", ())) < want]
        if short:
            notes.append(f"{dataset}: unfinished ({', '.join(short)} seeds)")
        for d_ in diverged.values():
            notes.append(f"{dataset}: {d_['label']} diverged on seed{'s' if len(d_['seeds']) > 1 else ''} "
                         f"{', '.join(map(str, d_['seeds']))} (left out of its mean)")
    table = paper_table(runs) + "".join(f"\n(!) {n}" for n in notes) + ("\n" if notes else "")
    print(table)
    if args.out:
        atomic_write_text(args.out, table)
        print(f"table: {args.out}")
    return 0


def _final_json(run_dir: Path) -> dict:
    """A run's final.json; a missing or unreadable one is a ValueError naming the file."""
    from ..atomic_io import read_json
    path = run_dir / FINAL_JSON
    if not path.exists():
        raise ValueError(f"{path} does not exist: the row of results.csv names a run that is not there; rerun "
                         "the grid to rebuild results.csv from its runs")
    data = read_json(path, "delete that run directory and rerun to redo it")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a kd2m result (expected a JSON object)")
    return data


def cmd_compare(args) -> int:
    from ..atomic_io import atomic_write_text
    from .results import read_rows
    from .tables import compare_table
    csv_path = RunDir(args.run_dir).results_csv  # every run of the directory: the pairs are named explicitly
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} does not exist: is {args.run_dir} a kd2m run directory?")
    rows = read_rows(csv_path)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    pairs = []
    for text in args.pairs:
        a, sep, b = text.partition(":")
        if not sep or not a or not b:
            raise ValueError(f"compare: expected A:B (two method keys), got {text!r}")
        pairs.append((a, b))
    if args.suffix:
        pairs += [(m + args.suffix, m) for m in methods if m + args.suffix in methods]
    if not pairs:
        raise ValueError("compare: give A:B pairs or --suffix SUFFIX matching methods of the run; methods: "
                         + ", ".join(methods))
    wanted = {m for pair in pairs for m in pair}
    settings = {}
    for r in rows:  # the runs' own records of how they were trained
        if r["method"] in wanted and r.get("run_dir"):
            settings[(r["method"], int(r["seed"]))] = _final_json(Path(args.run_dir) / r["run_dir"]).get("settings")
    table = compare_table(rows, pairs, settings)
    print(table)
    if args.out:
        atomic_write_text(args.out, table)
        print(f"table: {args.out}")
    return 0


def cmd_metrics(args) -> int:
    from .. import losses
    from ..data import available_datasets
    from ..models import available_models
    print("distances (--metrics): " + ", ".join(losses.available("kd2m")))
    print("baselines (--baselines): ce, " + ", ".join(losses.available("baseline")))
    if args.models:
        from ..models import describe_models
        print(describe_models())
    else:
        print("models: " + ", ".join(available_models()) + " (and timm:NAME, torchvision:NAME; kd2m metrics --models)")
    print("datasets: " + ", ".join(available_datasets()))
    return 0
