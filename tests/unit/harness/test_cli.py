"""The command line's failure contract: a bad argument, name, file or condition ends in exit 2 and one
``kd2m: error: …`` line naming the problem (no traceback); --help still prints usage."""
import os
import time

import pytest
import torch

from kd2m.harness.cli import main

from helpers import TINY_GRID, alias_bomb, bench_yaml, one_line_error, run_cli


def _random_bytes(path):
    path.write_bytes(os.urandom(4096))


def _wrong_arch(path):
    from kd2m.models import build_model
    torch.save(build_model("digits_mlp", 10, 1, 8).state_dict(), path)  # a student's weights, not a teacher's


def _file_in_the_way(tmp):
    (tmp / "afile").write_text("x")
    return tmp / "afile" / "sub"


BAD_CLI = [
    # (id, argv builder (tmp, out) -> list, needles in the error line)
    ("unknown-metric", lambda tmp, out: ["run", "--metrics", "w2,wasserstein", "--out", out],
     ["'wasserstein'", "available:", "cw2", "sliced_w2", "gauss_kl"]),
    ("unknown-dataset", lambda tmp, out: ["run", "--dataset", "mnist", "--out", out],
     ["'mnist'", "available:", "digits", "cifar10", "svhn"]),
    ("unknown-teacher", lambda tmp, out: ["run", "--teacher", "resnet9000", "--out", out, *TINY_GRID],
     ["teacher", "'resnet9000'", "available:", "digits_cnn", "cifar_resnet34"]),
    ("unknown-student", lambda tmp, out: ["run", "--student", "mlp9", "--out", out, *TINY_GRID],
     ["student", "'mlp9'", "available:", "digits_mlp"]),
    ("unknown-baseline", lambda tmp, out: ["run", "--baselines", "ce,fitnets", "--out", out],
     ["fitnets", "ce, kd, dkd"]),
    ("unknown-metric-option", lambda tmp, out: bench_yaml(tmp, f"out: {out}\nmetrics: [sinkhorn]\n"
                                                      "metric_options: {sinkhorn: {epsilon: 0.1}}\n"),
     ["sinkhorn", "epsilon", "eps"]),
    ("missing-dataset", lambda tmp, out: ["run", "--dataset", "cifar10", "--data-root", tmp / "EMPTY_DIR",
                                          "--out", out], ["EMPTY_DIR", "--download"]),
    ("missing-imagefolder-root", lambda tmp, out: ["run", "--dataset", "imagefolder", "--out", out],
     ["imagefolder", "--data-root"]),
    ("out-in-proc", lambda tmp, out: ["run", "--out", "/proc/forbidden", *TINY_GRID], ["/proc/forbidden"]),
    ("out-under-a-file", lambda tmp, out: ["run", "--out", _file_in_the_way(tmp), *TINY_GRID], ["afile"]),
    ("yaml-unknown-key", lambda tmp, out: bench_yaml(tmp, f"out: {out}\nepochz: 3\n"), ["'epochz'", "valid keys"]),
    ("yaml-bad-type", lambda tmp, out: bench_yaml(tmp, f"out: {out}\nepochs: three\n"), ["epochs", "int", "'three'"]),
    ("yaml-bad-list", lambda tmp, out: bench_yaml(tmp, f"out: {out}\nmetrics: 5\n"), ["metrics"]),
    ("yaml-bad-seeds", lambda tmp, out: bench_yaml(tmp, f"out: {out}\nseeds: [a, b]\n"), ["seeds"]),
    ("yaml-not-a-mapping", lambda tmp, out: bench_yaml(tmp, "- w2\n- cw2\n"), ["c.yaml", "mapping"]),
    ("yaml-invalid", lambda tmp, out: bench_yaml(tmp, "epochs: [1, 2\n"), ["c.yaml", "not valid YAML"]),
    ("yaml-missing", lambda tmp, out: ["bench", tmp / "nope.yaml"], ["nope.yaml", "does not exist"]),
    ("yaml-alias-bomb", lambda tmp, out: bench_yaml(tmp, f"out: {out}\n" + alias_bomb(4, 12, "epochs")),
     ["c.yaml", "aliases", "more than 10000 values", "write the values out"]),
    ("yaml-recursive-alias", lambda tmp, out: bench_yaml(tmp, f"out: {out}\nseeds: &s [1, *s]\n"),
     ["c.yaml", "recursive"]),
    ("yaml-too-deep", lambda tmp, out: bench_yaml(tmp, "epochs: " + "[" * 20000 + "]" * 20000 + "\n"),
     ["c.yaml", "nested too deeply"]),
    ("yaml-seeds-bool", lambda tmp, out: bench_yaml(tmp, f"out: {out}\nseeds: [true]\n"), ["seeds", "integers", "True"]),
    ("nan-weight", lambda tmp, out: ["run", "--weight", "nan", "--out", out], ["weight", "nan"]),
    ("negative-lambda", lambda tmp, out: ["run", "--weight", "-1", "--out", out], ["weight", "-1"]),
    ("zero-epochs", lambda tmp, out: ["run", "--epochs", "0", "--out", out], ["epochs", "≥ 1"]),
    ("negative-teacher-cache", lambda tmp, out: ["run", "--teacher-cache", "-2", "--out", out], ["teacher_cache", "≥ 0"]),
    ("teacher-cache-too-big", lambda tmp, out: ["run", "--teacher-cache", "4", "--max-cache-mb", "0.5", "--out", out,
                                                *TINY_GRID],
     ["teacher_cache", "4 view(s) of 1437 items", "MiB", "--max-cache-mb 0.5", "teacher_cache: 0"]),
    ("bad-sweep", lambda tmp, out: ["bench", "--sweep", "weight=big", "--out", out, *TINY_GRID], ["--sweep", "big"]),
    ("teacher-random-bytes", lambda tmp, out: ["run", "--pretrained-teacher", tmp / "rand.pt", "--out", out, *TINY_GRID],
     ["rand.pt"]),
    ("teacher-wrong-arch", lambda tmp, out: ["run", "--pretrained-teacher", tmp / "mlp.pt", "--out", out, *TINY_GRID],
     ["mlp.pt", "do not fit", "DigitsCNN"]),
    ("teacher-missing-file", lambda tmp, out: ["run", "--pretrained-teacher", tmp / "gone.pt", "--out", out, *TINY_GRID],
     ["gone.pt", "do not exist"]),
]


@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in BAD_CLI])
def test_bad_cli_input_is_one_clear_line(tmp_path, capsys, argv, needles):
    (tmp_path / "EMPTY_DIR").mkdir()
    _random_bytes(tmp_path / "rand.pt")
    _wrong_arch(tmp_path / "mlp.pt")
    out = tmp_path / "out"
    code, _, err = run_cli(argv(tmp_path, out), capsys)
    one_line_error(code, err, *needles)


@pytest.mark.parametrize("argv", [["--dataset", "mnist"], ["--teacher", "nope"], ["--metrics", "nope"]],
                         ids=["dataset", "model", "metric"])
def test_unknown_names_are_refused_before_anything_is_written(tmp_path, capsys, argv):
    out = tmp_path / "out"
    code, _, err = run_cli(["run", *argv, "--out", out], capsys)
    one_line_error(code, err, "nope" if "nope" in argv else "mnist")
    assert not out.exists()


def test_pairwise_memory_refusal_is_fast_and_suggests_linear_metrics(tmp_path, capsys, monkeypatch):
    import kd2m.harness.grid

    def no_data(*a, **k):
        raise AssertionError("the dataset was loaded before the memory check")
    monkeypatch.setattr(kd2m.harness.grid, "build_dataset", no_data)
    t0 = time.perf_counter()
    code, _, err = run_cli(["run", "--metrics", "w2", "--batch-size", "4096", "--max-pairwise-mb", "100",
                            "--out", tmp_path / "o", "--no-progress"], capsys)
    assert time.perf_counter() - t0 < 10
    line = one_line_error(code, err, "'w2'", "n=4096", "MiB", "--max-pairwise-mb", "sliced_w2", "gauss_w2",
                          "gauss_kl", "sinkhorn")
    assert "no lighter" in line  # sinkhorn is O(n²) here too: not offered as the way out
    assert not (tmp_path / "o" / "teacher").exists()


@pytest.mark.parametrize("argv, needles", [
    (["run", "--epochs", "x"], ["--epochs", "invalid int value: 'x'", "kd2m run --help"]),
    (["run", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["frob"], ["invalid choice: 'frob'", "kd2m --help"]),
    ([], ["required: command"]),
    (["bench", "--sweep"], ["--sweep", "expected one argument"]),
    (["run", "--threads", "-3"], ["--threads", "≥ 0", "-3", "kd2m run --help"]),
    (["bench", "--num-workers", "-1"], ["--num-workers", "≥ 0", "-1"]),
], ids=["bad-int", "unknown-option", "unknown-command", "no-command", "missing-value", "negative-threads",
        "negative-workers"])
def test_bad_command_line_is_one_line_exit_2(argv, needles, capsys, tmp_path, monkeypatch):
    import kd2m.harness.grid
    monkeypatch.setattr(kd2m.harness.grid, "run_grid", lambda *a, **k: pytest.fail("the grid started"))
    with pytest.raises(SystemExit) as info:
        main(argv + ["--out", str(tmp_path / "o")] if argv[:1] in (["run"], ["bench"]) and "--sweep" not in argv
             else argv)
    assert info.value.code == 2
    one_line_error(2, capsys.readouterr().err, *needles)


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kd2m run") and "--batch-size" in out


@pytest.mark.parametrize("error", [MemoryError(), torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                              "allocate 20.00 GiB\nmore")],
                         ids=["MemoryError", "cuda-OOM"])
def test_out_of_memory_is_one_line_with_advice(error, capsys, monkeypatch):
    import kd2m.harness.cli

    def oom(args):
        raise error
    monkeypatch.setattr(kd2m.harness.cli, "cmd_metrics", oom)
    code, _, err = run_cli(["metrics"], capsys)
    assert code == 2
    one_line_error(code, err, "out of memory", type(error).__name__, "smaller --batch-size")


def test_error_messages_are_capped(capsys, monkeypatch):
    import kd2m.harness.cli

    def huge(args):
        raise ValueError("seeds: got [" + "x, " * 1_000_000 + "]")
    monkeypatch.setattr(kd2m.harness.cli, "cmd_metrics", huge)
    code, _, err = run_cli(["metrics"], capsys)
    line = one_line_error(code, err, "seeds: got [x, x")
    assert code == 2 and len(line) <= len("kd2m: error: ") + 300 and line.endswith("…")


def test_main_gives_the_callers_sigterm_handler_back(capsys):
    """`main` handles SIGTERM only while it runs: a caller in the same process (pytest, a notebook)
    finds its own handler in place afterwards, after a success and after an error alike."""
    import signal

    from kd2m.harness.cli import main

    def own(signum, frame):
        pass
    before = signal.signal(signal.SIGTERM, own)
    try:
        assert main(["metrics"]) == 0
        assert signal.getsignal(signal.SIGTERM) is own
        assert main(["compare", "/nonexistent/run-dir", "a:b"]) == 2
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)
    capsys.readouterr()
