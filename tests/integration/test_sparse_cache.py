"""The sparse teacher cache (``teacher_topk: K``): per token the teacher's top-K ids and
log-probabilities and the log-mass of the rest, read by the token divergences as a SparseTeacher;
its size guard counts 12·K + 4 bytes per token; what cannot read it is refused in one line before
training; a cache belongs to its teacher's weights and its corpus."""
import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from kd2m.errors import ConfigError
from kd2m.harness.config import RunConfig
from kd2m.losses.sparse_teacher import SparseTeacher
from kd2m.models import build_model
from kd2m.training.teacher import CachedTeacher, teacher_cache
from kd2m.training.teacher_cache import FixedViews, SparseTable, build_teacher_cache

from helpers import python_docs_text

pytest.importorskip("transformers")

V, L = 31, 8


class Blocks(torch.utils.data.Dataset):
    """Token blocks (x, y): y is x shifted by one, the last position ignored."""

    def __init__(self, n=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, V, (n, L), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        y = torch.roll(self.x[i], -1)
        y[-1] = -100
        return self.x[i], y


def _teacher(seed=1):
    torch.manual_seed(seed)
    return build_model("hf:gpt2", V, 1, L, n_layer=1, n_embd=16, n_head=2).eval()


def test_the_cache_keeps_each_tokens_top_k_log_probabilities_and_tail():
    teacher, data = _teacher(), Blocks()
    cache = build_teacher_cache(teacher, FixedViews(data, 1, 0), "penultimate", torch.device("cpu"), raw=True,
                                topk=4, temperature=2.0)
    assert isinstance(cache.logits, SparseTable) and cache.logits.ids.shape == (6, L, 4)
    keys = torch.tensor([4, 1])
    _, got = cache.lookup(keys)
    assert isinstance(got, SparseTeacher) and len(got) == 2 * L and got.temperature == 2.0
    with torch.no_grad():
        z = teacher(data.x[keys]).double().reshape(-1, V) / 2.0  # the oracle, float64
    for row in (0, 5, 2 * L - 1):
        order = torch.argsort(z[row], descending=True)
        lse = torch.logsumexp(z[row], 0)
        assert got.ids[row].tolist() == order[:4].tolist()
        assert torch.allclose(got.logprobs[row].double(), z[row, order[:4]] - lse, atol=1e-5)
        tail = math.log(float(torch.exp(z[row, order[4:]] - lse).sum()))
        assert float(got.tail_logprob[row]) == pytest.approx(tail, abs=1e-5)
    assert got.bytes_per_token() == 12 * 4 + 4


def test_a_top_v_cache_gives_the_dense_caches_divergences():
    """k = V keeps every token: the divergences read from it equal those read from the logits."""
    teacher, data = _teacher(), Blocks()
    views = FixedViews(data, 1, 0)
    dense = build_teacher_cache(teacher, views, "penultimate", torch.device("cpu"), raw=True)
    sparse = build_teacher_cache(teacher, views, "penultimate", torch.device("cpu"), raw=True, topk=V)
    keys = torch.tensor([0, 3, 5])
    zs = torch.randn(3 * L, V, generator=torch.Generator().manual_seed(0))
    labels = torch.stack([data[i][1] for i in keys.tolist()]).reshape(-1)
    from kd2m import losses
    for name in ("fkl", "rkl", "jsd", "skew_kl", "skew_rkl", "tvd"):
        a = losses.get(name)(student_logits=zs, teacher_logits=CachedTeacher(dense, "penultimate", True)(
            None, keys)[1].reshape(-1, V), labels=labels)
        b = losses.get(name)(student_logits=zs, teacher_logits=CachedTeacher(sparse, "penultimate", True)(
            None, keys)[1], labels=labels)
        assert float(b) == pytest.approx(float(a), rel=1e-5, abs=1e-7), name


def test_the_size_guard_counts_the_sparse_bytes_per_token():
    teacher, data = _teacher(), Blocks()
    views = FixedViews(data, 1, 0)
    dense_mib = 6 * L * (16 + V) * 4 / 2**20  # features + float32 logits per token
    with pytest.raises(ValueError, match=r"124 bytes per token.*--teacher-topk K \(12·K \+ 4 bytes per token\)"):
        build_teacher_cache(teacher, views, "penultimate", torch.device("cpu"), raw=True, max_mb=dense_mib * 0.9)
    sparse_mib = 6 * L * (16 * 4 + 12 * 2 + 4) / 2**20
    assert sparse_mib < dense_mib * 0.9
    build_teacher_cache(teacher, views, "penultimate", torch.device("cpu"), raw=True, topk=2, max_mb=dense_mib * 0.9)
    with pytest.raises(ValueError, match=r"top-3 logits\) in float32 need .* MiB; 40 bytes per token"):
        build_teacher_cache(teacher, views, "penultimate", torch.device("cpu"), raw=True, topk=3,
                            max_mb=sparse_mib * 0.5)
    with pytest.raises(ValueError, match="k=32 exceeds the vocabulary size V=31"):
        build_teacher_cache(teacher, views, "penultimate", torch.device("cpu"), raw=True, topk=V + 1)


def _cfg(**kw):
    return RunConfig(**{"task": "lm", "dataset": "python_docs", "teacher_topk": 8, "select_k": "none",
                        "seeds": [0], **kw})


def test_the_cache_is_rebuilt_when_its_teacher_or_its_corpus_changes():
    """The memo of a seed's tables was keyed by the teacher's id and the views' count and seed: a
    teacher trained in place, or another corpus of the same size, got the table built before."""
    cfg = _cfg().resolved()
    teacher, memo = _teacher(), {}
    views = FixedViews(Blocks(seed=0), 1, 0)
    first = teacher_cache(teacher, views, "penultimate", cfg, torch.device("cpu"), memo, True)
    assert teacher_cache(teacher, views, "penultimate", cfg, torch.device("cpu"), memo, True) is first
    other = FixedViews(Blocks(seed=1), 1, 0)  # another corpus, same size, same seed
    rebuilt = teacher_cache(teacher, other, "penultimate", cfg, torch.device("cpu"), memo, True)
    assert not torch.equal(rebuilt.logits.ids, first.logits.ids)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(-1.0)  # the teacher's weights change in place
    again = teacher_cache(teacher, views, "penultimate", cfg, torch.device("cpu"), memo, True)
    assert not torch.equal(again.logits.ids, first.logits.ids)
    dense = dict(vars(cfg), teacher_topk=None)
    assert isinstance(teacher_cache(teacher, views, "penultimate", RunConfig(**dense), torch.device("cpu"), memo,
                                    True).logits, torch.Tensor)  # K is part of the key


def test_what_cannot_read_a_top_k_cache_is_refused_in_the_config():
    with pytest.raises(ConfigError, match=r"teacher_topk: kd: kd read\(s\) the teacher's full logits"):
        _cfg(baselines=["ce", "kd"], metrics=[]).resolved()
    with pytest.raises(ConfigError, match="teacher_topk: the top-K teacher is what the teacher cache keeps"):
        _cfg(teacher_cache=0).resolved()
    with pytest.raises(ConfigError, match="temperatures 1, 2"):
        _cfg(baselines=["ce"], metrics=[], students={"two": [{"term": "fkl"},
                                                             {"term": "jsd", "options": {"temperature": 2.0}}]}
             ).resolved()
    with pytest.raises(ConfigError, match="teacher_topk: must be an integer ≥ 1"):
        _cfg(teacher_topk=0).resolved()
    # a named student's distance with no unit (so unit batch) is refused for its unit, the real
    # problem, not for reading the full logits (which only its unit batch made it do)
    with pytest.raises(ConfigError, match="students: pooled: w2 has unit batch"):
        _cfg(baselines=["ce"], metrics=[], students={"pooled": [{"term": "w2"}]}).resolved()
    # the six divergences and the distances per token read it
    _cfg(baselines=["ce", "fkl", "rkl", "jsd", "skew_kl", "skew_rkl", "tvd"], metrics=["gauss_w2"]).resolved()


def _corpus_config(tmp_path, **extra):
    corpus = python_docs_text(tmp_path / "corpus.txt", 6_000)
    cfg = {"task": "lm", "dataset": f"text:{corpus}", "image_size": 40, "epochs": 1, "teacher_epochs": 1,
           "seeds": [0], "teacher_options": {"n_layer": 1, "n_embd": 16, "n_head": 2},
           "student_options": {"n_layer": 1, "n_embd": 8, "n_head": 2}, "select_k": "none",
           "metrics": [], "baselines": ["ce", "jsd"], "parallel": 1, "progress": False,
           "out": str(tmp_path / "out"), **extra}
    path = tmp_path / "lm.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _bench(path, *args):
    return subprocess.run([sys.executable, "-m", "kd2m", "bench", str(path), *args], capture_output=True, text=True,
                          check=False)


def test_a_k_above_the_vocabulary_and_a_dense_term_are_refused_in_one_line_before_training(tmp_path):
    done = _bench(_corpus_config(tmp_path, teacher_topk=300))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("kd2m: error: teacher_topk: 300 is more than the data's vocabulary (257 tokens)")
    assert not (tmp_path / "out" / "teacher").exists()
    done = _bench(_corpus_config(tmp_path, teacher_topk=8, baselines=["ce", "dkd"]))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "dkd read(s) the teacher's full logits" \
        in done.stderr, done.stderr


def test_a_student_of_a_divergence_and_a_distance_trains_on_the_top_k_cache(tmp_path):
    """A named student [jsd, gauss_w2 per token at weight auto] beside the baselines, every one
    reading the top-8 cache through the fused head; reported like any student."""
    path = _corpus_config(tmp_path, teacher_topk=8, students={
        "jsd_w2": [{"term": "jsd"}, {"term": "gauss_w2", "unit": "tokens", "weight": "auto"}]})
    done = _bench(path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"teacher", "ce", "jsd", "jsd_w2"}
    assert all(math.isfinite(float(r["test_ppl"])) and float(r["test_ppl"]) > 1 for r in rows.values())
    final = json.loads((out / "jsd_w2/seed0/final.json").read_text())
    assert final["settings"]["teacher_topk"] == 8 and final["auto_scales"]["gauss_w2"] > 0
    log = json.loads((out / "jsd_w2/seed0/log.jsonl").read_text().splitlines()[-1])
    assert set(log["terms"]) == {"jsd", "gauss_w2"} and all(math.isfinite(v) and v > 0 for v in log["terms"].values())
    assert "jsd_w2" in (out / "results.md").read_text()


def test_the_card_states_the_bytes_per_token():
    from kd2m.harness.card import reproduction_card
    card = reproduction_card(_cfg(baselines=["ce", "jsd"], metrics=[]))
    assert "| teacher_topk | 8 (100 bytes per token; every logit: 4·V) | config |" in card
