"""The benchmark scripts still run and print what they promise (tiny sizes; no timing is asserted)."""

import pytest

from helpers import REPO_ROOT
from helpers import load_benchmark as load

ROOT = REPO_ROOT


def test_throughput_rows_per_term_and_mode(tmp_path):
    """A row per distance and baseline, online and cached; map terms and spatial distances online only
    (the cache holds pooled features); cached rows (CRD reported, not held)."""
    out = tmp_path / "t.md"
    load("throughput").main(["--student", "digits_cnn", "--teacher", "digits_cnn", "--image-size", "8",
                             "--channels", "1", "--metrics", "w2,gauss_w2", "--baselines", "dkd,crd,at",
                             "--spatial", "gauss_w2", "--num-data", "64", "--steps", "1", "--rounds", "1",
                             "--batch-size", "16", "--device", "cpu", "--out", str(out)])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.read_text().splitlines()
            if line.startswith("| ")][1:]
    assert [r[0] for r in rows] == ["ce", "ce+teacher", "w2", "w2 (cached teacher)", "gauss_w2",
                                    "gauss_w2 (cached teacher)", "dkd", "dkd (cached teacher)", "crd",
                                    "crd (cached teacher)", "at", "gauss_w2 (spatial, diagonal)"]
    goals = {r[0]: r[4] for r in rows}
    assert goals["w2 (cached teacher)"] == "≥ 0.8" and goals["dkd (cached teacher)"] == "≥ 0.9"
    assert goals["crd (cached teacher)"] == "report" and goals["dkd"] == goals["at"] == ""
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    assert float(rows[0][2]) == 1.0 and float(rows[1][3]) == 1.0  # ratios to their own reference


def test_throughput_refuses_unknown_terms_spatial_baselines_and_maps_of_an_mlp(capsys):
    bench = load("throughput")
    for flag, value, said in (("--baselines", "kd,nosuch", "unknown loss term 'nosuch'"),
                              ("--spatial", "kd", "'kd' is not a KD²M distance"),
                              ("--baselines", "at", "leave the row out")):  # an MLP student has no maps
        with pytest.raises(SystemExit) as e:
            bench.main(["--student", "digits_mlp", "--teacher", "digits_cnn", "--image-size", "8", "--channels", "1",
                        "--metrics", "", "--baselines", "kd", "--spatial", "", "--batch-size", "8",
                        flag, value])  # the later flag wins
        assert e.value.code == 2
        assert said in capsys.readouterr().err


def test_metrics_benchmark_correlated_features(tmp_path):
    bench = load("metrics")
    s, t, *_ = bench.make_batch(64, seed=0, device="cpu", features="correlated")
    assert float(torch_corr(s.detach(), t)) > 0.9
    out = tmp_path / "m.md"
    assert bench.main(["--quick", "--metrics", "w2", "--features", "correlated", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| w2 |")]
    assert len(rows) == 2 and all(float(r.split("|")[5]) > 0 for r in rows)  # a ratio to POT in each row


def torch_corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return (a @ b) / (a.norm() * b.norm())


def test_swept_lambda_picks_the_best_finished_k_and_writes_its_fixed_lambda(tmp_path, capsys):
    """The rule behind configs/mnist1d-swept.yaml, on a hand-made sweep: per metric the K with the
    best mean accuracy over the seeds, a K that diverged on any seed excluded even when its other
    seeds score best, λ = K × mean calibrated scale over the finished runs, one significant digit."""
    import json
    runs = {  # metric, K, seed: (accuracy, calibrated scale) or None (diverged: no final.json)
        ("cw2", 1, 100): (0.70, 0.020), ("cw2", 1, 101): (0.72, 0.022),
        ("cw2", 3, 100): (0.78, 0.021), ("cw2", 3, 101): (0.76, 0.019),
        ("cw2", 10, 100): (0.90, 0.020), ("cw2", 10, 101): None,
        ("mmd_rbf", 0.3, 100): (0.65, 25.0), ("mmd_rbf", 0.3, 101): (0.66, 27.0),
        ("mmd_rbf", 1, 100): (0.64, 26.0), ("mmd_rbf", 1, 101): (0.645, 26.0),
    }
    for (metric, k, seed), run in runs.items():
        d = tmp_path / f"{metric}@auto*{k:g}" / f"seed{seed}"
        d.mkdir(parents=True)
        if run is not None:
            (d / "final.json").write_text(json.dumps({"test_acc": run[0], "auto_scales": {metric: run[1]}}))
    (tmp_path / "ce" / "seed100").mkdir(parents=True)  # not a sweep variant: ignored
    swept = load("swept_lambda")
    means, best, lam = swept.pick(swept.read_sweep(tmp_path)["cw2"])
    assert means[10.0] is None and best == 3.0
    assert means[3.0] == pytest.approx(0.77)
    # scale: mean of the five finished cw2 runs (0.020, 0.022, 0.021, 0.019, 0.020) = 0.0204; × 3 = 0.0612
    assert lam == 0.06
    assert swept.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "weights: {cw2: 0.06, mmd_rbf: 8}" in out   # 0.3 × 26 = 7.8 → 8
    assert "K=10: diverged" in out and "global K=1: mean over 2/2 metrics" in out
    # a fixed λ read back as K: λ / the mean scale (cw2: 0.0204 → 0.1 is K = 4.9; mmd_rbf: 26 → 52 is K = 2)
    assert swept.main([str(tmp_path), "--as-k", "cw2=0.1,mmd_rbf=52"]) == 0
    out = capsys.readouterr().out
    assert "cw2        λ = 0.1 is K = 4.9\n" in out and "mmd_rbf    λ = 52 is K = 2\n" in out
    with pytest.raises(SystemExit, match="no w2@auto"):
        swept.main([str(tmp_path), "--as-k", "w2=1"])


def test_gpu_benchmark_refuses_without_cuda_and_runs_its_preset_with_overrides(tmp_path, capsys, monkeypatch):
    """benchmarks/gpu.py: one line and exit 2 where there is no CUDA; with --device given (the CPU
    here, at tiny sizes) it runs throughput.py's rows with the protocol's options."""
    gpu = load("gpu")
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu.main([])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    assert "resnet32x4" in gpu.PRESET and "bf16" in gpu.PRESET and "online,cached" in gpu.PRESET
    table = gpu.main(["--student", "digits_cnn", "--teacher", "digits_cnn", "--image-size", "8", "--channels", "1",
                      "--classes", "10", "--batch-size", "8", "--num-data", "16", "--steps", "1", "--rounds", "1",
                      "--metrics", "w2", "--baselines", "kd", "--spatial", "gauss_w2", "--device", "cpu",
                      "--out", str(tmp_path / "g.md")])
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert names == ["ce", "ce+teacher", "w2", "w2 (cached teacher)", "kd", "kd (cached teacher)",
                     "gauss_w2 (spatial, diagonal)"]
    assert "amp bf16, channels_last True" in table


def test_divergence_memory_benchmark_rows(tmp_path):
    """benchmarks/divergences.py: a whole and a chunked measurement per term, in fresh processes."""
    table = load("divergences").main(["--terms", "fkl", "--tokens", "64", "--vocab", "50", "--chunk", "16",
                                      "--out", str(tmp_path / "d.md")])
    row = next(line for line in table.splitlines() if line.startswith("| fkl |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert len(cells) == 6 and float(cells[2]) >= 0 and float(cells[4]) >= 0


def test_startup_benchmark_rows(tmp_path):
    """benchmarks/startup.py: one median per command, each against the full import (whose ratio is 1)."""
    table = load("startup").main(["--repeats", "1", "--out", str(tmp_path / "s.md")])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| command")}
    assert set(rows) == set(load("startup").COMMANDS)
    assert all(float(seconds) > 0 for seconds, _ in rows.values())
    assert rows[load("startup").REFERENCE][1] == "1.00"
    assert (tmp_path / "s.md").read_text() == table


def test_a_kept_table_carries_the_command_machine_and_load_it_ran_under(tmp_path, monkeypatch):
    """``--out DIR/NAME.md`` writes ``DIR/NAME.env.json``: the grid's environment fields, the command as
    run (script named from the repository's root), OMP_NUM_THREADS and the load before and after."""
    import json
    monkeypatch.setattr("sys.argv", ["/somewhere/benchmarks/startup.py", "--repeats", "1", "--out", "x.md"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "bench-x" / "startup.md"
    load("startup").main(["--repeats", "1", "--out", str(out)])
    env = json.loads((tmp_path / "bench-x" / "startup.env.json").read_text())
    from kd2m.harness.environment import describe_environment
    assert set(describe_environment()) < set(env)
    assert env["command"] == "python benchmarks/startup.py --repeats 1 --out x.md"
    assert env["omp_num_threads"] == "1" and env["wall_seconds"] > 0
    assert env["load_average_1min_start"] >= 0 and env["load_average_1min_end"] >= 0


def test_fused_head_benchmark_rows(tmp_path):
    """benchmarks/fused_head.py: an unfused and a fused measurement per vocabulary in fresh
    processes, and the sparse teacher's error per divergence, at tiny sizes."""
    table = load("fused_head").main(["--quick", "--tokens", "16", "--dim", "8", "--k", "4", "--vocabs", "600",
                                     "--out", str(tmp_path / "f.md")])
    speed, trl, error = table.split("\n\n")[1::2]  # three tables, each after its caption

    def cells(part):
        return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                for line in part.splitlines() if line.startswith("| ")}
    rows = cells(speed)
    assert float(rows["600"][1]) >= 0 and float(rows["600"][3]) >= 0 and float(rows["600"][6]) > 0
    # JSD against hidden states + output layer: whole logits, kd2m's fused head, TRL's chunked divergence
    assert "fused: peak MiB" in trl and "trl: peak MiB" in trl
    assert all(len(r) == 6 and all(float(c) >= 0 for c in r) for r in cells(trl).values() if r[0][0].isdigit())
    rows = cells(error)
    errors = [float(c) for c in rows["fkl (" + next(r for r in rows if r.startswith("fkl (")).split("(")[1]]]
    assert len(errors) == 4 and all(0 <= e <= 1 for e in errors) and errors == sorted(errors, reverse=True)


def test_feature_balance_is_the_ratio_of_gradient_norms_at_the_features(tmp_path, capsys):
    """λ_f = Σ_b ‖∇_f CE(b)‖ / Σ_b ‖∇_f D(b)‖ over the first 4 batches of 128 in index order, f the
    student's penultimate features, recomputed here independently of the engine (FeatureTap, the
    formula of the term, torch.autograd.grad); the script prints it beside the engine's λ_θ."""
    import math

    import torch
    import torch.nn.functional as F

    from kd2m import FeatureTap, metrics
    from kd2m.data import build_dataset
    from kd2m.harness.config import RunConfig
    from kd2m.harness.trainer import Trainer
    from kd2m.models import build_model
    from kd2m.training.build import freeze
    fb = load("feature_balance")
    bundle = build_dataset("digits")
    cfg = RunConfig(metrics=["cw2"], baselines=[], weights={"cw2": "auto"}, epochs=1, progress=False).resolved()
    torch.manual_seed(0)
    teacher = freeze(build_model("digits_cnn", 10, 1, 8))
    torch.manual_seed(1)
    student = build_model("digits_mlp", 10, 1, 8)
    for m in student.modules():  # dropout off: the oracle cannot replay the engine's masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tr = Trainer(student, bundle, cfg, cfg.methods()[0], 0, tmp_path / "r", torch.device("cpu"), teacher=teacher)
    tr._setup()
    got = fb.feature_scales(tr.step, bundle.train, 128)[0]
    d = metrics.get("cw2")
    ce_sum = term_sum = 0.0
    student.train()
    with FeatureTap(student) as s_tap, FeatureTap(teacher) as t_tap:
        for b in range(4):
            items = [bundle.train[i] for i in range(128 * b, 128 * (b + 1))]
            x, y = torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items])
            logits = student(x)
            with torch.no_grad():
                teacher(x)
            f = s_tap.feature
            norm = lambda v: math.sqrt(float(torch.autograd.grad(v, f, retain_graph=True)[0].pow(2).sum()))  # noqa: E731,B023 (called in this iteration)
            ce_sum += norm(F.cross_entropy(logits, y))
            term_sum += norm(d(f, t_tap.feature.detach(), y))
    tr.remove_hooks()
    assert got == pytest.approx(ce_sum / term_sum, rel=1e-4)
    assert got != pytest.approx(tr.scales[0], rel=0.1)  # not the parameter-level λ under another name


def test_feature_balance_prints_both_scales_per_distance(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher_epochs: 1\nprogress: false\n")
    assert load("feature_balance").main([str(cfg), "--seeds", "0,", "--metrics", "cw2,mmd_rbf",
                                         "--out", str(tmp_path / "g")]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("distance"))
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[head + 1:]}
    assert set(rows) == {"cw2", "mmd_rbf"}
    for lam_theta, lam_f, ratio in rows.values():
        assert lam_theta > 0 and lam_f > 0 and ratio == pytest.approx(lam_f / lam_theta, rel=2e-3)


def test_compare_grids_pairs_one_method_across_two_grids(tmp_path, capsys):
    """A − B per method over the shared seeds (the paired t interval written out here), A − CE and
    B − CE; and grids whose CE-only students differ are refused (nothing to pair)."""
    import json

    from scipy import stats
    ce = {0: 0.60, 1: 0.62, 2: 0.61}
    grids = {"a": {"cw2": {0: 0.75, 1: 0.78, 2: 0.74}}, "b": {"cw2": {0: 0.74, 1: 0.75, 2: 0.74}}}
    for name, methods in grids.items():
        rows = [{"method": m, "seed": s, "test_acc": v, "run_dir": f"{m}/seed{s}"}
                for m, by in {"ce": ce, **methods}.items() for s, v in by.items()]
        for r in rows:  # each run's stored settings: the same in both grids
            (tmp_path / name / r["run_dir"]).mkdir(parents=True)
            (tmp_path / name / r["run_dir"] / "final.json").write_text(json.dumps({"settings": {"epochs": 1}}))
        (tmp_path / name / "results.json").write_text(json.dumps({"rows": rows}))
    assert load("compare_grids").main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab.md")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "ab.md").read_text() == out  # --out keeps what was printed
    d = [1.0, 3.0, 0.0]  # A − B in points
    half = stats.t.ppf(0.975, 2) * (sum((x - 4 / 3) ** 2 for x in d) / 2) ** 0.5 / 3 ** 0.5
    assert f"| CW2 (E) | +1.33 [{4 / 3 - half:+.2f}, {4 / 3 + half:+.2f}] |" in out
    assert "**+14.67 [" in out and "mean Δ vs CE: A +14.67, B +13.33" in out
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    rows[0]["test_acc"] += 0.01
    (tmp_path / "b" / "results.json").write_text(json.dumps({"rows": rows}))
    with pytest.raises(SystemExit, match="CE-only students differ"):
        load("compare_grids").main([str(tmp_path / "a"), str(tmp_path / "b")])


def test_topk_error_is_zero_at_the_whole_vocabulary_and_a_lower_bound_below_it(tmp_path, capsys):
    # a tiny byte-level grid (vocabulary 257): at k = V the sparse teacher is the full one; below it,
    # merging the tail into one ghost token can only lower an f-divergence (error ≥ 0)
    from helpers import python_docs_text, run_cli
    corpus = python_docs_text(tmp_path / "corpus.txt", 6000)
    grid = tmp_path / "grid"
    rc, _, err = run_cli(["run", "--task", "lm", "--dataset", f"text:{corpus}", "--baselines", "ce", "--metrics", "",
                          "--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--image-size", "16",
                          "--parallel", "1", "--no-progress", "--out", grid], capsys)
    assert rc == 0, err
    table = load("topk_error").main([str(grid), "--ks", "4,257", "--tokens", "200", "--out", str(tmp_path / "t.md")])
    rows = {line.split("|")[1].strip().split(" (")[0]: line for line in table.splitlines() if line.startswith("| ")}
    for name in ("fkl", "rkl", "jsd", "skew_kl", "skew_rkl", "tvd"):
        at_4, at_v = [float(cell.strip(" %")) for cell in rows[name].split("|")[2:4]]
        assert abs(at_v) < 1e-3 and at_4 >= -1e-3, rows[name]
    mass = [float(c) for c in rows["teacher mass kept"].split("|")[2:4]]
    assert 0 < mass[0] < 1 and mass[1] == 1.0
    assert "200 held-out positions" in table and (tmp_path / "t.md").read_text().startswith("Sparse top-k")
