"""What several test modules share: the repository root, the environment and command of a `kd2m`
subprocess, tiny grids and configs, a disk
that fills up, the command line's one-line error contract, and tiny CIFAR files in torchvision's on-disk
format.

Importable as ``helpers`` (pyproject's ``[tool.pytest.ini_options] pythonpath`` puts tests/ on the path);
test modules import from here, never from one another."""
import csv
import errno
import hashlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np

import kd2m.atomic_io as ckpt_mod
from kd2m.harness.cli import main

#: the repository's root: README.md, configs/, benchmarks/
REPO_ROOT = Path(__file__).resolve().parents[1]
#: the environment of a `kd2m` subprocess: unbuffered, one thread
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
#: the smallest grid that still trains a teacher and a distilled student
TINY_GRID = ["--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--baselines", "ce", "--metrics", "cw2",
             "--no-progress"]
#: one epoch of teacher and students, one seed: the methods are the caller's (or the defaults)
ONE_EPOCH_GRID = ["--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--no-progress"]


def kd2m_cmd(*args):
    """``python -m kd2m ARGS`` with this interpreter."""
    return [sys.executable, "-m", "kd2m", *args]


def one_line_error(code, err, *needles):
    """``code`` ≠ 0 and ``err`` is exactly one ``kd2m: error:`` line containing every needle."""
    assert code != 0
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("kd2m: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def one_line_exit_2(code, err, *needles):
    """``code`` is 2 and ``err`` is exactly one ``kd2m: error:`` line containing every needle."""
    assert code == 2
    return one_line_error(code, err, *needles)


def run_cli(argv, capsys):
    """``kd2m.harness.cli.main(argv)`` in this process: (exit code, stdout, stderr) of this call alone."""
    capsys.readouterr()  # what ran before is not this call's output
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def bench_yaml(tmp, text):
    """``kd2m bench`` of a config file holding ``text``: the argv."""
    p = tmp / "c.yaml"
    p.write_text(text)
    return ["bench", p]


def alias_bomb(levels, width, key="seeds"):
    """A YAML list whose aliases nest ``levels`` deep, ``width`` wide: ``width**levels`` leaves."""
    names = "abcdefghijklmnop"
    items = [f"&a [{', '.join(['x'] * width)}]"]
    items += [f"&{names[i]} [{', '.join([f'*{names[i - 1]}'] * width)}]" for i in range(1, levels)]
    return f"{key}: [{', '.join(items)}]\n"


def fail_writes(monkeypatch, match, fail_on=2):
    """Make the ``fail_on``-th atomic write whose temp file path contains ``match`` hit ENOSPC halfway."""
    real_fdopen = os.fdopen
    calls = {"n": 0}

    class HalfWritten:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, key):
            return getattr(self._f, key)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        if match in os.readlink(f"/proc/self/fd/{fd}"):
            calls["n"] += 1
            if calls["n"] == fail_on:
                return HalfWritten(f)
        return f
    monkeypatch.setattr(ckpt_mod.os, "fdopen", fdopen)
    return calls


def python_docs_text(path, chars: int = 6000):
    """Write the first ``chars`` characters of Python's own documentation (``pydoc_data``'s topics,
    in key order: real English with code, the same on every run) to ``path``; returns ``path``."""
    from pydoc_data.topics import topics
    path.write_text("".join(topics[k] for k in sorted(topics))[:chars])
    return path


def load_benchmark(name):
    """``benchmarks/NAME.py`` as a module, with benchmarks/ on sys.path as ``python benchmarks/NAME.py``
    has it (for its sibling helpers, e.g. host_memory), whichever test loads a benchmark first."""
    import importlib.util
    folder = str(REPO_ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# tiny CIFAR files in torchvision's on-disk format, md5-registered so torchvision's own check passes
def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def pixels(rng, n, stats, size=32) -> np.ndarray:
    """``(n, size, size, 3)`` uint8 drawn with the dataset's channel mean/std, so normalising gives ~N(0, 1)."""
    mean, std = np.asarray(stats[0]) * 255, np.asarray(stats[1]) * 255
    return np.clip(rng.normal(mean, std, size=(n, size, size, 3)), 0, 255).round().astype(np.uint8)


def write_cifar(root, cls, num_classes, label_key, stats, n=10):
    """Write ``cls``'s files (pickled dicts, rows of 1024 R + 1024 G + 1024 B bytes); return the test images/labels."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, _ in cls.train_list + cls.test_list:
        hwc = pixels(rng, n, stats)
        labels = rng.integers(0, num_classes, n).tolist()
        entry = {"batch_label": name, "data": hwc.transpose(0, 3, 1, 2).reshape(n, 3072), label_key: labels,
                 "filenames": [f"img{i}.png" for i in range(n)]}
        if label_key == "fine_labels":
            entry["coarse_labels"] = [label // 5 for label in labels]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {cls.meta["key"]: [f"class{i}" for i in range(num_classes)]}
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return hwc, labels  # the test split's, written last


def register_checksums(monkeypatch, root, cls):
    folder = root / cls.base_folder
    monkeypatch.setattr(cls, "train_list", [[name, md5(folder / name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(folder / name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})
