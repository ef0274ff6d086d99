"""kd2m.integrations.hf: KD2MTrainer's loss against the model's own, the teacher frozen and in
eval mode, the projectors trained but outside the student's files (saved beside them and
restored on resume), gradient accumulation and two gloo processes giving the gradient of one
batch, and KD2MTrainingArguments read from a command line — all with tiny random GPT-2s."""
import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser  # noqa: E402

from kd2m.integrations.hf import DISTILLER_FILE, KD2MTrainer, KD2MTrainingArguments  # noqa: E402

from helpers import REPO_ROOT  # noqa: E402

VOCAB, LENGTH = 64, 12
SRC = str(REPO_ROOT / "src")


def _gpt2(layers, width, seed, dropout=0.1):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_layer=layers, n_embd=width, n_head=2,
                                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                      bos_token_id=0, eos_token_id=0))


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = [{"input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g)} for _ in range(n)]
    for item in data:
        item["labels"] = item["input_ids"].clone()
    return data


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                disable_tqdm=True, learning_rate=1e-2)
    return KD2MTrainingArguments(**{**base, **kw})


def test_without_terms_the_loss_is_the_models_own(tmp_path):
    """CE on labels shifted by one, −100 (padding) ignored: the model's ``out.loss`` exactly."""
    student, teacher = _gpt2(1, 16, 0, dropout=0.0), _gpt2(2, 32, 1)
    data = _data(4)
    trainer = KD2MTrainer(model=student, args=_args(tmp_path, kd2m_terms=[]), train_dataset=data, teacher=teacher)
    ids = torch.stack([d["input_ids"] for d in data])
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    own = student(**batch).loss
    for mode in (True, False):  # training (no accumulation: scale 1) and evaluation
        student.train(mode)
        loss, outputs = trainer.compute_loss(student, dict(batch), return_outputs=True)
        torch.testing.assert_close(loss, own, rtol=1e-6, atol=1e-6)
        assert outputs.logits.shape == (4, LENGTH, VOCAB)
    assert trainer.last_output.terms == {}
    unpadded = {"input_ids": ids, "labels": ids.clone()}
    metrics = trainer.evaluate(eval_dataset=[{k: v[i] for k, v in unpadded.items()} for i in range(4)])
    assert metrics["eval_loss"] == pytest.approx(float(student(**unpadded).loss), rel=1e-5)


def test_teacher_stays_in_eval_mode_without_gradient_and_projectors_train_outside_the_student(tmp_path):
    student, teacher = _gpt2(1, 16, 0), _gpt2(2, 32, 1, dropout=0.3)
    assert teacher.training
    teaching = []  # the teacher's mode at each of its forward passes
    teacher.register_forward_pre_hook(lambda module, args, kwargs: teaching.append(module.training), with_kwargs=True)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    terms = ["fkl", {"term": "gauss_w2", "weight": 0.1, "unit": "tokens", "student_layer": "transformer.h.0",
                     "teacher_layer": "transformer.h.1"}]
    args = _args(tmp_path, kd2m_terms=terms, max_steps=3, per_device_train_batch_size=4, save_strategy="steps",
                 save_steps=3)
    trainer = KD2MTrainer(model=student, args=args, train_dataset=_data(12), teacher=teacher)
    proj = trainer.distiller.term_modules[1].loss.projector.weight
    assert proj.shape == (32, 16)  # block 0 of the student (16 wide) onto block 1 of the teacher (32)
    proj_before = proj.detach().clone()
    n_probe = len(teaching)
    result = trainer.train()
    assert teaching[n_probe:] == [False, False, False]   # one teacher forward per step, in eval mode each time
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert result.global_step == 3
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 3 and all(row["kd2m/gauss_w2"] > 0 and row["kd2m/fkl"] > 0 and row["kd2m/ce"] > 0
                                    for row in logged)
    assert {id(p) for p in trainer.distiller.parameters()} <= \
        {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not torch.equal(proj.detach(), proj_before)  # the projector trained
    assert proj.grad is None                            # ...and its gradient was cleared after each step
    ckpt = tmp_path / "checkpoint-3"
    trainer.save_model(str(tmp_path / "student"))
    for folder in (ckpt, tmp_path / "student"):
        loaded, info = GPT2LMHeadModel.from_pretrained(str(folder), output_loading_info=True)
        assert list(info["unexpected_keys"]) == [] and list(info["missing_keys"]) == []
        assert all(torch.equal(v, student.state_dict()[k]) for k, v in loaded.state_dict().items())
        saved = torch.load(folder / DISTILLER_FILE, weights_only=True)
        torch.testing.assert_close(saved["term_modules.1.loss.projector.weight"], proj.detach(), rtol=0, atol=0)

    # resuming: a fresh trainer (its projector drawn anew) takes the checkpoint's back
    again = KD2MTrainer(model=_gpt2(1, 16, 5), args=args, train_dataset=_data(12), teacher=_gpt2(2, 32, 1))
    fresh = again.distiller.term_modules[1].loss.projector.weight
    assert not torch.equal(fresh.detach(), proj.detach())
    again.train(resume_from_checkpoint=str(ckpt))   # at its last step already: loads, trains no further
    torch.testing.assert_close(fresh.detach(), proj.detach(), rtol=0, atol=0)


def _one_sgd_step(tmp_path, batch, accumulate):
    student, teacher = _gpt2(1, 16, 0, dropout=0.0), _gpt2(2, 32, 1)
    args = _args(tmp_path, kd2m_terms=[{"term": "fkl", "weight": 2.0}], kd2m_ce_weight=0.5, max_steps=1,
                 per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate, optim="sgd",
                 learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0)
    trainer = KD2MTrainer(model=student, args=args, train_dataset=_data(4), teacher=teacher)
    trainer.train()
    return {k: v.detach().clone() for k, v in student.named_parameters()}


def test_max_grad_norm_clips_the_student_and_the_projectors_by_one_norm(tmp_path):
    """One SGD step of lr η with max_grad_norm c, a distance whose projector maps the student's 16
    features to the teacher's 32: the whole update, student and projector together, has norm η·c
    (the gradient's norm is far above c here). The Trainer's own clipping took the student's alone,
    so the projector stepped by its full gradient."""
    student, teacher = _gpt2(1, 16, 0, dropout=0.0), _gpt2(2, 32, 1)
    lr, clip = 0.5, 1e-3
    args = _args(tmp_path, kd2m_terms=[{"term": "gauss_w2", "weight": 1.0, "unit": "tokens"}], max_steps=1,
                 per_device_train_batch_size=4, optim="sgd", learning_rate=lr, lr_scheduler_type="constant",
                 weight_decay=0.0, max_grad_norm=clip)
    trainer = KD2MTrainer(model=student, args=args, train_dataset=_data(4), teacher=teacher)
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    proj = dict(trainer.distiller.named_parameters())
    assert proj, "the widths differ: the term has a projector"
    proj_before = {k: v.detach().clone() for k, v in proj.items()}
    trainer.train()
    step = [v.detach() - before[k] for k, v in student.named_parameters()]
    proj_step = [v.detach() - proj_before[k] for k, v in proj.items()]
    total = torch.sqrt(sum((d.double() ** 2).sum() for d in step + proj_step))
    assert float(total) == pytest.approx(lr * clip, rel=1e-3)
    assert float(torch.sqrt(sum((d.double() ** 2).sum() for d in proj_step))) > 0


def test_gradient_accumulation_gives_the_gradient_of_one_batch(tmp_path):
    """2 micro-batches of 2 and one batch of 4 (equal lengths, no padding): one SGD step of
    0.5·CE + 2·fkl lands on the same weights."""
    start = {k: v.detach().clone() for k, v in _gpt2(1, 16, 0, dropout=0.0).named_parameters()}
    one = _one_sgd_step(tmp_path / "one", 4, 1)
    two = _one_sgd_step(tmp_path / "two", 2, 2)
    assert not torch.equal(one["transformer.wte.weight"], start["transformer.wte.weight"])
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_integrations_hf import _args, _data, _gpt2
    from kd2m.integrations.hf import KD2MTrainer

    out, batch, clip = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    student, teacher = _gpt2(1, 16, 0, dropout=0.0), _gpt2(2, 32, 1)
    terms = [{"term": "fkl", "weight": 2.0}, {"term": "gauss_w2", "weight": 0.1, "unit": "tokens"}]
    args = _args(out, kd2m_terms=terms, max_steps=1, per_device_train_batch_size=batch, optim="sgd",
                 learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=clip,
                 ddp_backend="gloo" if "RANK" in os.environ else None)
    trainer = KD2MTrainer(model=student, args=args, train_dataset=_data(4), teacher=teacher)
    seen = []   # the number of tokens the global distance is taken on, per call


    class Seen:  # the distance, recording its batch
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, s, t, *rest):
            seen.append(s.shape[0])
            return self.inner(s, t, *rest)


    loss = trainer.distiller.term_modules[1].loss
    loss.metric = Seen(loss.metric)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.detach().clone() for k, v in student.named_parameters()}
    state.update({"distiller." + k: v.detach().clone() for k, v in trainer.distiller.state_dict().items()})
    torch.save({"state": state, "seen": seen}, os.path.join(out, f"rank{rank}.pt"))
''')


@pytest.mark.parametrize("clip", ["0", "1"])
def test_two_gloo_processes_train_as_one_process_on_the_doubled_batch(tmp_path, monkeypatch, clip):
    """torchrun, 2 ranks × 2 sequences vs 1 process × 4: CE + fkl + a global-batch distance
    (its projector's gradient averaged over ranks) give the same weights after one SGD step, also
    when max_grad_norm clips (1: below the gradient's norm here), student and projector together
    by the norm of the averaged gradients."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEST_DIR": str(Path(__file__).parent),
           "PYTHONPATH": os.pathsep.join([SRC, str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "two"), "2", clip]
    ranks = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    monkeypatch.setenv("TEST_DIR", env["TEST_DIR"])
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "one"), "4", clip])
    runpy.run_path(str(script), run_name="__main__")   # the one process, here, while the ranks run
    _, err = ranks.communicate(timeout=300)
    assert ranks.returncode == 0, err[-3000:]
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert one["seen"] == [4 * LENGTH] and [r["seen"] for r in ranks] == [[4 * LENGTH], [4 * LENGTH]]
    for k, v in one["state"].items():
        for r in ranks:
            torch.testing.assert_close(r["state"][k], v, rtol=1e-5, atol=1e-6)


def test_arguments_from_a_command_line():
    parser = HfArgumentParser(KD2MTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--kd2m_terms", '[{"term": "fkl", "weight": 0.5}, "gauss_w2"]',
         "--kd2m_ce_weight", "0.25", "--report_to", "none"])
    assert args.kd2m_terms == [{"term": "fkl", "weight": 0.5}, "gauss_w2"] and args.kd2m_ce_weight == 0.25
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--kd2m_terms", "fkl, jsd",
                                                  "--report_to", "none"])
    assert args.kd2m_terms == ["fkl", "jsd"]
    json.loads(args.to_json_string())  # the logged arguments stay JSON
    with pytest.raises(ValueError, match=r"kd2m_terms: not valid JSON .*give a JSON list") as e:
        KD2MTrainingArguments(output_dir="x", report_to="none", kd2m_terms='[{"term": fkl}]')
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"terms\[1\].*unknown"):
        KD2MTrainingArguments(output_dir="x", report_to="none", kd2m_terms="fkl,no_such_term")
    with pytest.raises(ValueError, match=r"kd2m_ce_weight"):
        KD2MTrainingArguments(output_dir="x", report_to="none", kd2m_ce_weight=-1.0)


@pytest.mark.parametrize("module, missing, extra", [("kd2m.integrations.hf", "transformers", "hf"),
                                                    ("kd2m.integrations.trl", "trl", "trl"),
                                                    ("kd2m.integrations.lightning", "lightning", "lightning")])
def test_a_missing_library_names_the_extra_in_one_line(monkeypatch, module, missing, extra):
    import importlib
    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)   # as if it were not installed
    for name in ("kd2m.integrations.hf", "kd2m.integrations.trl", "kd2m.integrations.lightning"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError) as e:
        importlib.import_module(module)
    assert str(e.value).endswith(f'pip install "kd2m[{extra}]"') and "\n" not in str(e.value)
