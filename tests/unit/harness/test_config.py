"""Configs (kd2m.harness.config): YAML read strictly (duplicate keys, alias bombs, merge keys, exponent numbers),
errors quoting bounded values, student entries and weights resolved as written, ce_weight checked."""
import time

import pytest

from kd2m import losses
from kd2m.errors import ConfigError
from kd2m.harness.config import RunConfig, from_mapping, load_yaml

from helpers import alias_bomb, bench_yaml, one_line_error, run_cli


def test_a_444_byte_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """9**9 (387 million) leaves: expanded or printed, that was an 800 MB error message and 3 GB of memory."""
    text = alias_bomb(9, 9)
    assert len(text) < 460
    t0 = time.perf_counter()
    code, _, err = run_cli(bench_yaml(tmp_path, text), capsys)
    assert time.perf_counter() - t0 < 5
    one_line_error(code, err, "aliases", "more than 10000 values")


def test_config_errors_quote_a_bounded_part_of_the_value(tmp_path, capsys):
    items = ", ".join(str(i) for i in range(5000))
    code, _, err = run_cli(bench_yaml(tmp_path, f"epochs: [{items}]\n"), capsys)
    line = one_line_error(code, err, "epochs", "int", "[0, 1, 2")
    assert len(line) < 250


def test_yaml_anchors_of_a_real_config_still_work(tmp_path):
    from kd2m.harness.config import load_yaml
    p = tmp_path / "c.yaml"
    p.write_text("metrics: [gauss_kl, gauss_ckl]\nmetric_options: {gauss_kl: &r {ridge: 0.1}, gauss_ckl: *r}\n"
                 "seeds: [0, 1]\n")
    cfg = load_yaml(p)
    assert cfg.term_options == {"gauss_kl": {"ridge": 0.1}, "gauss_ckl": {"ridge": 0.1}} and cfg.seeds == [0, 1]


def resolved(**values):
    return from_mapping({"metrics": [], "baselines": ["ce"], **values}).resolved()


def test_distill_is_refused_where_a_student_has_its_name():
    with pytest.raises(ConfigError, match="distill: its student is named 'cw2'.*students: has a student 'cw2'"):
        resolved(students={"cw2": [{"term": "cw2", "weight": 0.1}]}, distill=[{"term": "cw2", "weight": 1.0}])
    both = resolved(students={"mine": [{"term": "cw2", "weight": 0.1}]}, distill=[{"term": "cw2", "weight": 1.0}])
    assert {m.key: m.terms[0].weight for m in both.methods() if m.terms} == {"mine": 0.1, "cw2": 1.0}


@pytest.mark.parametrize("text, key, lines", [
    ("students:\n  mine: [{term: cw2}]\n  mine: [{term: kd}]\n", "'mine'", "lines 2 and 3"),
    ("epochs: 1\nlr: 0.1\nepochs: 3\n", "'epochs'", "lines 1 and 3"),
    ("term_options: {dkd: {beta: 1, beta: 2}}\n", "'beta'", "lines 1 and 1"),
])
def test_a_yaml_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path, text, key, lines):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=f"c.yaml: key {key} is given twice.*{lines}"):
        load_yaml(p)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base: &b {beta: 1, alpha: 2}\nterm_options: {dkd: {<<: *b, beta: 8}}\n".replace("base", "x_base"))
    with pytest.raises(ConfigError, match="unknown key 'x_base'"):  # merged fine; the extra key is what is refused
        load_yaml(p)


def test_exponent_numbers_in_yaml_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) read `lr: 1e-2` as the string '1e-2', refused as 'expected float'; the
    command line's --lr 1e-2 was a number. Now both are."""
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-2\nweights: {cw2: 5E-3}\nlr_min: 1.5e-5\n")
    cfg = load_yaml(p)
    assert (cfg.lr, cfg.weights, cfg.lr_min) == (0.01, {"cw2": 0.005}, 1.5e-5)


@pytest.mark.parametrize("values, needle", [
    (dict(distill=[{"weight": 1.0}]), "distill[0]: the entry {'weight': 1.0} names no term"),
    (dict(students={"a": [{"term": "cw2", "options": [1]}]}), "options of 'cw2' must be a mapping"),
    (dict(students={"a": [{"term": ["cw2"]}]}), "term must be one name (a string), got ['cw2']"),
    (dict(students={".": ["cw2"]}), "'.' cannot name a student"),
    (dict(students={"..": ["cw2"]}), "'..' cannot name a student"),
    (dict(students={"results.csv": ["cw2"]}), "'results.csv' cannot name a student"),
    (dict(students={"a b": ["cw2"]}), "'a b' cannot name a student"),
])
def test_bad_student_entries_are_one_clear_config_error(values, needle):
    with pytest.raises(ConfigError) as e:
        resolved(**values)
    assert needle in str(e.value)


def test_students_with_the_same_terms_get_their_own_labels():
    cfg = resolved(students={"cw2_a": [{"term": "cw2", "weight": 1.0}], "cw2_b": [{"term": "cw2", "weight": 0.1}]})
    labels = {m.key: m.label for m in cfg.methods()}
    assert labels["cw2_a"] != labels["cw2_b"] and "cw2_a" in labels["cw2_a"]
    assert resolved(metrics=["cw2"]).methods()[1].label == "CW2 (E)"   # unique labels stay as they were


def test_weight_sets_the_distances_lambda_only():
    cfg = RunConfig(weight=0.5).resolved()
    by_key = {m.key: m for m in cfg.methods()}
    default = {m.key: m for m in RunConfig().resolved().methods()}
    for b in ("kd", "dkd", "dist"):
        assert (by_key[b].terms[0].weight, by_key[b].ce_weight) == (default[b].terms[0].weight, default[b].ce_weight)
    assert {by_key[m].terms[0].weight for m in cfg.metrics} == {0.5}


@pytest.mark.parametrize("ce_weights, message", [
    ({"ce": 0.5}, "'ce' trains on CE alone"),
    ({"kdd": 0.5}, "'kdd' names no student"),
    ({"kd": 0}, "CE weight of 'kd' must be a finite number > 0"),
    ({"kd": float("nan")}, "must be a finite number > 0"),
    ({"kd": True}, "must be a finite number > 0"),
    ([0.1], "expected a mapping of student names"),
])
def test_bad_ce_weights_are_refused(ce_weights, message):
    from kd2m.errors import ConfigError
    from kd2m.harness.config import RunConfig
    with pytest.raises(ConfigError, match=message):
        RunConfig(ce_weights=ce_weights).resolved()


def test_ce_weight_defaults():
    """KD's registered CE weight is the authors' 0.1 (with λ 0.9); the digits grid keeps CE at 1 with
    its swept KD λ = 1, and drops both the moment the user sets their own `weights:`. `--weight` sets
    the distances' λ only: the baselines keep their λ and CE weights (it used to turn KD's CE weight
    1 into 0.1 and DKD's λ 0.1 into 1 on the digits)."""
    from kd2m.harness.config import RunConfig
    assert (losses.spec("kd").weight, losses.spec("kd").ce_weight) == (0.9, 0.1)
    assert {losses.spec(n).ce_weight for n in losses.available() if n != "kd"} == {1.0}

    def ce(cfg):
        return {m.key: m.ce_weight for m in cfg.resolved().methods()}
    assert ce(RunConfig()) == {"ce": 1.0, "kd": 1.0, "dkd": 1.0, "dist": 1.0, **{m: 1.0 for m in RunConfig().metrics}}
    assert ce(RunConfig(weight="auto"))["kd"] == 1.0
    lam = {m.key: m.terms[0].weight for m in RunConfig(weight=0.5).resolved().methods() if m.terms}
    assert (lam["kd"], lam["dkd"], lam["dist"]) == (1.0, 0.1, 1.0) and lam["w2"] == lam["cw2"] == 0.5
    assert ce(RunConfig(weights={"kd": 0.9}))["kd"] == 0.1
    assert ce(RunConfig(weights={"kd": 0.9}, ce_weights={"kd": 0.5}))["kd"] == 0.5
    both = RunConfig(metrics=[], baselines=[], students={"two": ["kd", "cw2"]}, ce_weights={}).resolved()
    assert [m.ce_weight for m in both.methods()] == [1.0]  # several terms: 1 unless given


def test_an_auto_weight_sweep_sweeps_the_baselines_at_auto_alike():
    """The baselines get the distances' sweep budget and rule — `--sweep auto_weight=…`
    varies K of every term at `auto` (MNIST-1D's baselines), and leaves a baseline at a number alone."""
    from kd2m.harness.config import RunConfig
    from kd2m.harness.grid import sweep_variants
    cfg = RunConfig(dataset="mnist1d", metrics=["cw2"], baselines=["ce", "kd", "dkd"], seeds=[100],
                    weights={"kd": "auto", "dkd": 0.1}).resolved()
    got = {m.key: [(t.weight, t.auto) for t in m.terms] for _, m in sweep_variants(cfg, ("auto_weight", [0.3, 3.0]))}
    assert got == {"ce": [], "kd@auto*0.3": [(0.3, True)], "kd@auto*3": [(3.0, True)], "dkd": [(0.1, False)],
                   "cw2@auto*0.3": [(0.3, True)], "cw2@auto*3": [(3.0, True)]}
