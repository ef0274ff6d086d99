"""Writes the documentation's reference pages from the code before Sphinx reads any source.

- ``_generated/cli.md``: every command's ``--help``, from :func:`kd2m.harness.cli.build_parser`;
- ``_generated/config.md``: every configuration key with its default and help, from
  :class:`kd2m.harness.config.RunConfig`'s fields and the datasets' defaults
  (:mod:`kd2m.harness.recipes`);
- ``_generated/terms.md``: the distances and the field's methods, from the term and metric
  registries' own facts;
- ``_generated/crd_pairs.md``: the CIFAR-100 protocol's per-pair settings, from ``configs/crd/``;
- ``_generated/NAME_selected.md``: the K of ``weight: auto`` a pilot grid chose, per term, with
  every candidate's holdout score (``select-k/selected.json``);
- ``_generated/digits_headline.md``, and for every folder of :data:`EXPERIMENTS`
  ``_generated/NAME_results.md`` and ``_generated/NAME_env.md``: an experiment's headline table,
  its full table and where it ran, from the tool's own files in ``experiments/NAME/``
  (:func:`kd2m.harness.results.read_summary`, ``results.md``, ``env.json``), never copied by hand.
- ``_generated/FOLDER_NAME.md`` for every benchmark table ``experiments/FOLDER/NAME.md`` kept beside
  its ``NAME.env.json``: the table as its script wrote it, then the command, machine and load it
  ran under.

Nothing here is typed twice: a new option, key or term appears on the next build.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:  # unchanged files keep Sphinx's cache valid
        path.write_text(text)


def _subparsers(parser):
    for action in parser._actions:  # argparse exposes its subcommands nowhere else
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    return {}


def cli_page() -> str:
    from kd2m.harness.cli import build_parser
    parser = build_parser()
    out = ["# Command line", "", "Generated from the argument parser: each command's `--help`, as printed.", "",
           "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in _subparsers(parser).items():
        out += [f"## `kd2m {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def config_page() -> str:
    from kd2m.harness import config, recipes
    out = ["# Configuration keys", "",
           "Every key of a YAML config (`kd2m bench CONFIG`) is also a command-line option of `kd2m run` "
           "and `kd2m bench` (with `-` for `_`), except those marked *YAML only*. Generated from "
           "`kd2m.harness.config.RunConfig`.", "",
           "| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(config.RunConfig):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ""
        default = "(dataset's)" if default is None else f"`{default!r}`"
        meta = f.metadata
        where = " *YAML only*" if meta.get("cli") is False else ""
        out.append(f"| `{f.name}`{where} | {_cell(default)} | {_cell(meta.get('help', ''))} |")
    out += ["", "## Defaults per dataset", "",
            "A key left unset takes its dataset's default:", ""]
    for name, values in [*recipes.DATASET_DEFAULTS.items(), ("other images", recipes.IMAGE_DEFAULTS),
                         ("text", recipes.LM_DEFAULTS)]:
        out.append(f"- **{name}**: " + ", ".join(f"`{k}` {_cell(v)}" for k, v in values.items()))
    return "\n".join(out) + "\n"


def _option_defaults(fn, names) -> dict:
    """Defaults of a metric function's keyword options, from its signature."""
    import inspect
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {n: params[n].default for n in names if n in params and params[n].default is not inspect.Parameter.empty}


def _options_cell(names, defaults) -> str:
    cells = [f"`{n}={defaults[n]!r}`" if n in defaults else f"`{n}`" for n in names]
    return _cell(", ".join(cells)) if cells else "—"


def terms_page() -> str:
    from kd2m import losses, metrics
    out = ["# Distances and the field's methods", "",
           "Generated from the registries: each entry's facts as the engine reads them "
           "(`kd2m.metrics.spec(name)`, `kd2m.losses.spec(name)`).", "",
           "## KD²M distances", "", "| name | label | reads labels | options (defaults) |", "|---|---|---|---|"]
    for name in metrics.available():
        s = metrics.spec(name)
        out.append(f"| `{name}` | {_cell(s.label)} | {'yes' if s.uses_labels else 'no'} | "
                   f"{_options_cell(s.options, _option_defaults(s.fn, s.options))} |")
    out += ["", "## The field's methods (loss terms)", "",
            "| name | label | needs | options (defaults) | default λ | CE weight | warm-up (epochs) | paper |",
            "|---|---|---|---|---|---|---|---|"]
    for name in losses.available(family="baseline"):
        s = losses.spec(name)
        out.append(f"| `{name}` | {_cell(s.label)} | {', '.join(sorted(s.needs))} | "
                   f"{_options_cell(s.options, dict(s.defaults or ()))} | {s.weight:g} | "
                   f"{s.ce_weight:g} | {s.warmup or '—'} | {_cell(s.paper)} |")
    return "\n".join(out) + "\n"


#: what a CRD-protocol config's comments say when a value is not the authors' own for that pair
NO_WKD_CONFIG, NO_LS_RUN = "ships no config for this pair", "it logs no run of this pair"


def crd_pairs_page(root: Path) -> str:
    """The per-pair settings of ``configs/crd/*.yaml``, read from the configs themselves: the
    student's lr, DKD's β, and the LS and WKD students' values; ``\\*`` where WKD ships no config
    for the pair, ``\\*\\*`` where logit standardization logs no run of it (the configs' comments)."""
    import yaml

    from kd2m import losses
    dkd_beta = dict(losses.spec("dkd").defaults)["beta"]  # a config that sets no β runs the registered default

    def g(*values) -> str:
        return ", ".join(f"{v:g}" for v in values)
    rows = []
    for path in sorted((root / "configs" / "crd").glob("*.yaml")):
        text = path.read_text()
        c = yaml.safe_load(text)
        words = " ".join(text.split())  # the comments' sentences, across their line breaks
        wkd = "\\*" if NO_WKD_CONFIG in words else ""
        ls = "\\*\\*" if NO_LS_RUN in words else ""
        students, options = c["students"], c.get("term_options", {})
        kd, dkd = students["ls_kd"][0], students["ls_dkd"][0]["options"]
        wl, lf = students["wkd_l"][1], students["wkd_l+wkd_f"]
        wf = options["wkd_f"]
        cells = [g(c["lr"]), g(options.get("dkd", {}).get("beta", dkd_beta)),
                 g(kd["options"]["temperature"], kd["weight"]) + ls,
                 g(dkd["temperature"], dkd["alpha"], dkd["beta"] / dkd["alpha"]) + ls,
                 g(wl["weight"], wl["options"]["temperature"]) + wkd,
                 g(c["weights"]["wkd_f"], wf["mean_cov_ratio"], wf["spatial_grid"]) + wkd,
                 f"{g(lf[1]['weight'], lf[1]['options']['temperature'])}; "
                 f"{g(lf[2]['weight'], lf[2]['options']['mean_cov_ratio'], lf[2]['options']['spatial_grid'])}" + wkd]
        rows.append((-c["lr"], f"| {c['teacher']} → {c['student']} | " + " | ".join(cells) + " |"))
    head = ["| teacher → student | lr | DKD β | LS-KD T, w | LS-DKD T, w, β | WKD-L γ, T | WKD-F λ, ratio, grid | "
            "WKD-L+F γ, T; λ, ratio, grid |", "|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + [row for _, row in sorted(rows, key=lambda r: r[0])]) + "\n"


#: the repository's ``experiments/`` folder: one folder per grid the pages quote
EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"
#: every grid's folder (it holds the grid's ``results.md``): each gives ``_generated/NAME_results.md``
#: (its ``results.md``) and ``_generated/NAME_env.md`` (where it ran, from its ``env.json``); a new
#: folder needs no entry here
EXPERIMENTS = tuple(sorted(p.name for p in EXPERIMENTS_DIR.iterdir() if (p / "results.md").is_file()))
#: every benchmark table kept as ``FOLDER/NAME.md`` beside the ``FOLDER/NAME.env.json`` its script wrote
#: (``benchmarks/table_output.py``): each gives ``_generated/FOLDER_NAME.md``, the table and where it ran
BENCHMARK_TABLES = tuple(sorted(f"{p.parent.name}/{p.name.removesuffix('.env.json')}"
                                for p in EXPERIMENTS_DIR.glob("*/*.env.json")))
#: the experiments whose λ were chosen by a pilot grid (``select-k/selected.json``):
#: ``_generated/NAME_selected.md``
SELECTED = tuple(n for n in EXPERIMENTS if (EXPERIMENTS_DIR / n / "select-k" / "selected.json").is_file())


def headline(name: str):
    def page(root: Path) -> str:
        from kd2m.harness.results import read_summary
        from kd2m.harness.tables import headline_table
        return headline_table(read_summary(root / "experiments" / name / "summary.csv"), top=3)
    return page


def results_page(name: str):
    """``results.md`` as the run wrote it, less its title line (the page has its own)."""
    def page(root: Path) -> str:
        lines = (root / "experiments" / name / "results.md").read_text().splitlines()
        if lines and lines[0].startswith("# "):
            lines = lines[1:]
        return "\n".join(lines).strip() + "\n"
    return page


def machine(env: dict) -> str:
    """The CPU, torch and its kernel path and the thread count of an ``env.json`` (a grid's or a
    benchmark's), in words."""
    threads = env["torch_threads"]
    return (f"{env['cpu_model']} ({env['cpu_count']} CPUs), torch {env['torch_version']} on its "
            f"`{env['cpu_capability']}` kernels, {threads} thread{'s' if threads != 1 else ''}")


def env_line(name: str):
    def page(root: Path) -> str:
        import json
        env = json.loads((root / "experiments" / name / "env.json").read_text())
        return (f"Measured on {machine(env)} per process, Python {env['python_version']}, "
                f"kd2m {env['kd2m_version']} (`env.json`, written by the run).\n")
    return page


def benchmark_page(table: str):
    """A benchmark's table as its script wrote it, then the command, machine and load it ran under."""
    def page(root: Path) -> str:
        import json
        folder, name = table.split("/")
        env = json.loads((root / "experiments" / folder / f"{name}.env.json").read_text())
        omp = f"OMP_NUM_THREADS={env['omp_num_threads']} " if env.get("omp_num_threads") else ""
        commit = (env.get("git_commit") or "unknown")[:10]
        text = (root / "experiments" / folder / f"{name}.md").read_text().rstrip("\n")
        return (f"{text}\n\nMeasured by `{omp}{env['command']}` in {env['wall_seconds']:.0f} s on "
                f"{machine(env)}, commit {commit}; "
                f"the machine's one-minute load average was {env['load_average_1min_start']:.2f} when it started "
                f"and {env['load_average_1min_end']:.2f} when it ended (`{table}.env.json`, written by the script).\n")
    return page


def selected_k_page(name: str):
    """The K each term's pilot grid chose (``select-k/selected.json``, written by the grid) and the
    mean holdout score of every candidate K, the chosen one in bold."""
    def page(root: Path) -> str:
        import json

        from kd2m.harness.results import figure_of, label
        folder = root / "experiments" / name
        chosen = json.loads((folder / "select-k" / "selected.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        order = [*config["metrics"], *config["baselines"]]  # the grid's own order, as results.md lists them
        ks = [f"{k:g}" for k in chosen["candidates"]]
        figure = figure_of(json.loads((folder / "select-k" / "results.json").read_text())["rows"])
        places = 2 if figure.scale != 1 else 3  # percent as the tables print it; perplexity one place finer

        def cell(c, k):
            v = c["means"].get(k)
            text = "diverged" if v is None else f"{figure.scale * v:.{places}f}"
            return f"**{text}**" if k == f"{c['k']:g}" else text
        out = [f"| term | K chosen | {' | '.join(f'K = {k}' for k in ks)} |", "|---|---|" + "---|" * len(ks)]
        for term, c in sorted(chosen["chosen"].items(), key=lambda kv: order.index(kv[0])):
            out.append(f"| {label(term)} | {c['k']:g} | {' | '.join(cell(c, k) for k in ks)} |")
        seeds = ", ".join(map(str, chosen["seeds"]))
        return ("\n".join(out) + f"\n\nMean holdout {figure.name} over the selection seeds {seeds}, on a holdout of "
                f"{chosen['holdout']:g} of the training split (K = 0: the CE-only student; "
                f"`select-k/selected.json`).\n")
    return page


#: every generated page (``_generated/NAME.md``) and what writes it from the repository's root
PAGES = {
    "cli": lambda root: cli_page(),
    "config": lambda root: config_page(),
    "terms": lambda root: terms_page(),
    "crd_pairs": crd_pairs_page,
    "digits_headline": headline("digits"),
    **{f"{name}_results": results_page(name) for name in EXPERIMENTS},
    **{f"{name}_env": env_line(name) for name in EXPERIMENTS},
    **{f"{name}_selected": selected_k_page(name) for name in SELECTED},
    **{table.replace("/", "_"): benchmark_page(table) for table in BENCHMARK_TABLES},
}


def generate(app) -> None:
    target = Path(app.srcdir) / "_generated"
    root = Path(app.srcdir).parent
    for name, page in PAGES.items():
        _write(target / f"{name}.md", page(root))


def setup(app):
    app.connect("builder-inited", generate)
    return {"parallel_read_safe": True, "version": "1"}
