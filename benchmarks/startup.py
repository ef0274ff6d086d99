"""Start-up time of the command line: what `kd2m --version`, `kd2m --help` and an argument error
cost, against importing what every command used to import first (torch, POT and the metrics, via
`kd2m.harness.trainer`).

    python benchmarks/startup.py                     # 5 repeats of each, interleaved
    python benchmarks/startup.py --repeats 9 --out results/startup.md

Each measurement is a fresh interpreter (`python -c …` or `python -m kd2m …`), timed from the
parent with `time.perf_counter`; the rows are interleaved so that a busy machine slows them alike,
and the table gives each one's median and its ratio to the full import, measured side by side in
one run.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

from table_output import emit

#: name → the command line, in a fresh interpreter
COMMANDS = {
    "kd2m --version": [sys.executable, "-m", "kd2m", "--version"],
    "kd2m --help": [sys.executable, "-m", "kd2m", "--help"],
    "kd2m --bogus (argument error)": [sys.executable, "-m", "kd2m", "--bogus"],
    "kd2m run --help (its options are the config's fields)": [sys.executable, "-m", "kd2m", "run", "--help"],
    "import kd2m.harness.trainer (torch, POT, the metrics)": [sys.executable, "-c", "import kd2m.harness.trainer"],
}
REFERENCE = "import kd2m.harness.trainer (torch, POT, the metrics)"


def seconds(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="also write the Markdown table to this file")
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):  # interleaved: a busy machine slows every row alike
        for name, cmd in COMMANDS.items():
            times[name].append(seconds(cmd))
    ref = statistics.median(times[REFERENCE])
    lines = [f"Start-up, median of {args.repeats} fresh interpreters (interleaved), "
             f"Python {platform.python_version()}", "",
             "| command | median s | × the full import |", "|---|---|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.3f} | {med / ref:.2f} |")
    return emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
