"""Language models: the LLM field's divergences against their formulas, Hugging Face
causal LMs by name and from a local directory, text data, the lm task end to end, and a kd2m term
in a transformers.Trainer."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd2m import losses

from helpers import REPO_ROOT, python_docs_text

pytest.importorskip("transformers")

DIVERGENCES = ["fkl", "rkl", "jsd", "skew_kl", "skew_rkl", "tvd"]


def _kl(p, q):  # Σ_v p (log p − log q), in probability space
    return (p * (p.log() - q.log())).sum(-1)


def formula(name, zs, zt, labels=None, temperature=1.0, beta=0.5, alpha=0.1):
    """Each divergence written out from its definition: per position, then the mean over the kept ones."""
    ps, pt = F.softmax(zs / temperature, -1), F.softmax(zt / temperature, -1)
    if name == "fkl":
        d = _kl(pt, ps)
    elif name == "rkl":
        d = _kl(ps, pt)
    elif name == "jsd":
        m = (1 - beta) * ps + beta * pt
        d = _kl(pt, ps) if beta == 0 else _kl(ps, pt) if beta == 1 else beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    elif name == "skew_kl":
        d = _kl(pt, alpha * pt + (1 - alpha) * ps)
    elif name == "skew_rkl":
        d = _kl(ps, alpha * ps + (1 - alpha) * pt)
    else:
        d = 0.5 * (pt - ps).abs().sum(-1)
    d = d.reshape(-1)
    keep = torch.ones_like(d, dtype=torch.bool) if labels is None else labels.reshape(-1) != -100
    return d[keep].sum() / keep.sum()


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
    """TRL's GKDTrainer.generalized_jsd_loss (trl/experimental/gkd/gkd_trainer.py, TRL ≥ 0.16 through 1.16),
    reduction "batchmean", written out: log-space mixture, F.kl_div with log targets, mask then sum / kept."""
    ls = F.log_softmax(student_logits / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=ls.dtype)
        lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(lm, lt, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(lm, ls, reduction="none", log_target=True)
    if labels is not None:
        mask = labels != -100
        return jsd[mask].sum() / mask.sum().clamp_min(1)
    return jsd.sum() / jsd.size(0)


def _batch(b=3, length=5, v=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = (2 * torch.randn(b, length, v, generator=g, dtype=dtype)).requires_grad_()
    zt = 2 * torch.randn(b, length, v, generator=g, dtype=dtype)
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return zs, zt, labels


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_divergence_is_its_formula_with_masks_and_temperature(name, temperature):
    zs, zt, labels = _batch()
    term = losses.get(name, temperature=temperature)
    got = term(student_logits=zs, teacher_logits=zt, labels=labels)
    want = formula(name, zs, zt, labels, temperature)
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    g_got, = torch.autograd.grad(got, zs)
    g_want, = torch.autograd.grad(want, zs)
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-13)
    assert float(term(student_logits=zt.clone(), teacher_logits=zt, labels=labels)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trls_generalized_jsd_loss(beta):
    zs, zt, labels = _batch(seed=1)
    got = losses.get("jsd", beta=beta, temperature=1.5)(student_logits=zs, teacher_logits=zt, labels=labels)
    want = trl_generalized_jsd_loss(zs, zt, labels, beta=beta, temperature=1.5)
    assert torch.allclose(got, want, rtol=1e-12)
    assert torch.allclose(losses.get("jsd", beta=0.0)(student_logits=zs, teacher_logits=zt, labels=labels),
                          losses.get("fkl")(student_logits=zs, teacher_logits=zt, labels=labels))


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_skew_kl_at_alpha_zero_is_forward_kl_and_rkl_reverse(alpha):
    zs, zt, labels = _batch(seed=2)
    kw = dict(student_logits=zs, teacher_logits=zt, labels=labels)
    assert torch.allclose(losses.get("skew_kl", alpha=0.0)(**kw), losses.get("fkl")(**kw))
    assert torch.allclose(losses.get("skew_rkl", alpha=0.0)(**kw), losses.get("rkl")(**kw))
    assert float(losses.get("skew_kl", alpha=alpha)(**kw)) < float(losses.get("fkl")(**kw))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunked_equals_unchunked_and_ignored_positions_do_not_count(name):
    zs, zt, labels = _batch(b=4, length=7, seed=3)
    kw = dict(student_logits=zs, teacher_logits=zt, labels=labels)
    whole = losses.get(name, chunk_size=10_000)(**kw)
    chunked = losses.get(name, chunk_size=3)(**kw)           # 28 positions in chunks of 3, checkpointed
    assert torch.allclose(whole, chunked, rtol=1e-12)
    g1, = torch.autograd.grad(whole, zs)
    g2, = torch.autograd.grad(chunked, zs)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)
    moved = zs.detach().clone()
    moved[labels == -100] += 100.0                           # what an ignored position holds cannot matter
    assert torch.allclose(losses.get(name)(student_logits=moved, teacher_logits=zt, labels=labels), whole.detach())
    flat = losses.get(name)(student_logits=zs.reshape(-1, 11), teacher_logits=zt.reshape(-1, 11),
                            labels=labels.reshape(-1))        # (n, V) as the engine passes them
    assert torch.allclose(flat, whole)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergences_gradcheck_in_float64(name):
    zs, zt, labels = _batch(b=2, length=3, v=5, seed=4)
    term = losses.get(name, temperature=1.3, chunk_size=2)
    assert torch.autograd.gradcheck(lambda z: term(student_logits=z, teacher_logits=zt, labels=labels), (zs,))


def test_divergence_options_are_checked():
    zs, zt, labels = _batch()
    for name, opts, said in (("jsd", {"beta": 1.5}, r"beta must be in \[0, 1\]"),
                             ("fkl", {"temperature": 0}, "temperature"),
                             ("tvd", {"chunk_size": 0}, "chunk_size")):
        with pytest.raises(ValueError, match=said):
            losses.get(name, **opts)(student_logits=zs, teacher_logits=zt, labels=labels)
    with pytest.raises(ValueError, match="differ"):
        losses.get("fkl")(student_logits=zs, teacher_logits=zt[..., :5], labels=labels)


# ---------------------------------------------------------------------- models, data, the lm task
def _tiny_gpt2(vocab=257, length=16, **options):
    from kd2m.models import build_model
    return build_model("hf:gpt2", vocab, 1, length, **{"n_layer": 1, "n_embd": 16, "n_head": 2, **options})


def test_hf_models_by_name_return_logits_and_keep_their_names():
    from kd2m.features import FeatureTap
    torch.manual_seed(0)
    lm = _tiny_gpt2(n_layer=2)
    ids = torch.randint(0, 257, (3, 16))
    with FeatureTap(lm, ["transformer.h.1", "penultimate"], pool="none") as tap:
        logits = lm(ids)
    assert logits.shape == (3, 16, 257) and lm.feature_dim == 16
    assert tap.features["transformer.h.1"].shape == (3, 16, 16) and tap.features["penultimate"].shape == (3, 16, 16)
    assert "transformer.h.1.attn.c_attn.weight" in lm.state_dict()
    with pytest.raises(ValueError, match="vocab_size 300 is not the data's vocabulary"):
        _tiny_gpt2(vocab_size=300)
    with pytest.raises(ValueError, match="takes no option 'n_layers'"):
        _tiny_gpt2(n_layers=2)


def test_a_save_pretrained_directory_loads_as_teacher_and_is_identified_by_content(tmp_path):
    from kd2m.models.hf import load_hf_directory
    from kd2m.models.pretrained import weights_identity
    torch.manual_seed(0)
    lm = _tiny_gpt2()
    lm.save_pretrained(tmp_path / "t")
    back = load_hf_directory(tmp_path / "t", 257)
    ids = torch.randint(0, 257, (2, 16))
    assert torch.equal(back.eval()(ids), lm.eval()(ids))
    before = weights_identity(tmp_path / "t")
    with pytest.raises(ValueError, match="vocabulary has 257 tokens, the data's 300"):
        load_hf_directory(tmp_path / "t", 300)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_directory(tmp_path / "nothing", 257)
    _tiny_gpt2(n_layer=2).save_pretrained(tmp_path / "t")
    assert weights_identity(tmp_path / "t") != before


def test_text_is_packed_into_blocks_with_a_deterministic_held_out_split(tmp_path):
    from kd2m.data import build_dataset
    (tmp_path / "a.txt").write_text("héllo world. " * 40)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second document " * 30}) + "\n\n")
    bundle = build_dataset(f"text:{tmp_path}", image_size=8)
    assert bundle.task == "lm" and bundle.num_classes == 257 and bundle.image_size == 8
    x, y = bundle.train[0]
    assert x.shape == y.shape == (8,) and torch.equal(x[1:], y[:-1])  # y is x shifted by one token
    n = len(bundle.train) + len(bundle.test)
    assert len(bundle.test) == n // 10 and bytes(x[:6].tolist()).decode("utf-8") == "héllo"
    again = build_dataset(f"text:{tmp_path}", image_size=8)
    assert torch.equal(again.test[0][0], bundle.test[0][0])
    with pytest.raises(ValueError, match="too little text"):
        (tmp_path / "small").mkdir()
        (tmp_path / "small" / "s.txt").write_text("tiny")
        build_dataset(f"text:{tmp_path / 'small'}", image_size=8)


def _tiny_lm_config(tmp_path, **extra) -> Path:
    corpus = python_docs_text(tmp_path / "corpus.txt", 24_000)   # real text, ~290 blocks of 80 bytes
    cfg = {"task": "lm", "dataset": f"text:{corpus}", "image_size": 80, "epochs": 1, "teacher_epochs": 2, "seeds": [0],
           "teacher_options": {"n_layer": 2, "n_embd": 32, "n_head": 2},
           "student_options": {"n_layer": 1, "n_embd": 16, "n_head": 2},
           "metrics": ["gauss_w2", "cw2"], "baselines": ["ce", "fkl", "jsd"], "parallel": 1, "progress": False,
           "out": str(tmp_path / "out"), **extra}
    path = tmp_path / "lm.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_a_tiny_lm_grid_runs_end_to_end_through_the_cli(tmp_path):
    cfg = _tiny_lm_config(tmp_path)
    done = subprocess.run([sys.executable, "-m", "kd2m", "bench", str(cfg)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    import csv
    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"teacher", "ce", "fkl", "jsd", "gauss_w2", "cw2"}
    assert all(float(r["test_ppl"]) > 1.0 and 0 < float(r["test_acc"]) < 1 for r in rows.values())
    assert float(rows["teacher"]["test_ppl"]) < float(rows["ce"]["test_ppl"])   # a teacher worth distilling from
    md = (out / "results.md").read_text()
    assert "| method | perplexity |" in md and "lower is better" in md
    final = json.loads((out / "cw2/seed0/final.json").read_text())
    assert final["settings"]["optimizer"] == "adamw"
    term = final["settings"]["terms"][0]
    assert term["unit"] == "tokens" and term["auto"] is True
    log = [json.loads(line) for line in (out / "cw2/seed0/log.jsonl").read_text().splitlines()]
    assert math.isfinite(log[-1]["terms"]["cw2"]) and "test_ppl" in log[-1]


def test_a_vocabulary_mismatch_is_refused_before_training(tmp_path):
    cfg = _tiny_lm_config(tmp_path, teacher_options={"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 300})
    done = subprocess.run([sys.executable, "-m", "kd2m", "bench", str(cfg)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "kd2m: error:" in done.stderr and "vocab_size 300" in done.stderr and "257" in done.stderr
    assert not (tmp_path / "out" / "teacher").exists()


def _readme_trainer_snippet() -> str:
    """The code block of "In your own Hugging Face loop" (docs/integrations.md), as written."""
    page = (REPO_ROOT / "docs" / "integrations.md").read_text()
    section = page.split("**In your own Hugging Face loop.**", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_a_kd2m_term_in_a_transformers_trainer(tmp_path):
    """The KD2MTrainer snippet of docs/integrations.md, executed as written: CE + fkl + a KD²M
    distance between the last hidden states, the projector trained with the student, the teacher
    in eval mode (its dropout off) and untouched while it teaches, and the saved student loading
    back with no unexpected key, the projector saved beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    student = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_layer=1, n_embd=16, n_head=2))
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_layer=2, n_embd=32, n_head=2))
    assert teacher.training  # as built: dropout on, until the trainer says otherwise
    teaching = []            # the teacher's mode at each of its forward passes
    teacher.register_forward_pre_hook(lambda module, args, kwargs: teaching.append(module.training),
                                      with_kwargs=True)
    data = [{"input_ids": torch.randint(0, 64, (16,))} for _ in range(16)]
    for item in data:
        item["labels"] = item["input_ids"].clone()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    snippet = {"student": student, "teacher": teacher, "data": data, "out_dir": str(tmp_path)}
    code = _readme_trainer_snippet()
    trainer_line = code.index("trainer.train()")
    exec(compile(code[:trainer_line], "docs/integrations.md", "exec"), snippet)   # up to the training
    trainer = snippet["trainer"]
    projector = trainer.distiller.term_modules[1].loss.projector.weight
    proj_before = projector.detach().clone()
    probes = len(teaching)   # the projectors' sizing forward
    exec(compile(code[trainer_line:], "docs/integrations.md", "exec"), snippet)   # the training and the save
    assert teaching[probes:] == [False, False, False]   # one compute_loss per step, the teacher in eval mode in each
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert not torch.equal(projector.detach(), proj_before)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    loaded, info = GPT2LMHeadModel.from_pretrained(str(tmp_path / "student"), output_loading_info=True)
    assert list(info["unexpected_keys"]) == [] and list(info["missing_keys"]) == []
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in loaded.state_dict().items())
    saved = torch.load(tmp_path / "student" / "kd2m_distiller.pt", weights_only=True)
    assert torch.equal(saved["term_modules.1.loss.projector.weight"], projector.detach())


def test_task_lm_picks_the_text_benchmark_and_refuses_an_image_dataset():
    from kd2m.errors import ConfigError
    from kd2m.harness.config import RunConfig
    cfg = RunConfig(task="lm").resolved()
    assert (cfg.dataset, cfg.teacher, cfg.optimizer, cfg.unit, cfg.baselines) == \
        ("python_docs", "hf:gpt2", "adamw", "tokens", ["ce", "fkl", "rkl", "jsd"])
    assert RunConfig().resolved().dataset == "digits"
    with pytest.raises(ConfigError, match="dataset 'digits' is for classification"):
        RunConfig(task="lm", dataset="digits").resolved()
    with pytest.raises(ConfigError, match="'python_docs' is for lm"):
        RunConfig(task="classification", dataset="python_docs").resolved()
