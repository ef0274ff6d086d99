"""kd2m.integrations.trl: TRL's GKD loss plus a kd2m distance between the last hidden states,
with tiny random GPT-2s: training steps run, the term is in the loss (exactly λ·term over TRL's
own), its projector trains, the teacher stays in eval mode and untouched."""
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl.experimental.gkd")
datasets = pytest.importorskip("datasets")
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from kd2m.integrations.trl import KD2MGKDTrainer  # noqa: E402

VOCAB, LENGTH = 64, 10


def _gpt2(layers, width, seed, dropout=0.1):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_layer=layers, n_embd=width, n_head=2,
                                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _tokenizer():
    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<pad>", unk_token="<pad>")


def _collate(items):
    ids = torch.tensor([item["input_ids"] for item in items])
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt: only the completion is scored
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "prompts": ids[:, :3], "prompt_attention_mask": torch.ones_like(ids[:, :3])}


def test_gkd_loss_plus_a_hidden_state_term(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_list([{"input_ids": torch.randint(1, VOCAB, (LENGTH,), generator=g).tolist()}
                                       for _ in range(8)])
    student, teacher = _gpt2(1, 16, 0), _gpt2(2, 32, 1, dropout=0.3)
    teaching = []
    teacher.register_forward_pre_hook(lambda module, args, kwargs: teaching.append(module.training), with_kwargs=True)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = GKDConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, lmbda=0.0, seq_kd=False,
                     report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                     learning_rate=1e-2, max_length=LENGTH)
    trainer = KD2MGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                             processing_class=_tokenizer(), data_collator=_collate,
                             kd2m_terms=[{"term": "gauss_w2", "weight": 0.5, "unit": "tokens"}])
    proj = trainer.distiller.term_modules[0].loss.projector.weight
    assert proj.shape == (32, 16)   # the student's last hidden states (16) onto the teacher's (32)
    proj_before = proj.detach().clone()
    probes = len(teaching)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert teaching[probes:] == [False, False]          # one teacher forward per step (GKD's), in eval mode
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not torch.equal(proj.detach(), proj_before)  # the projector trained

    # the loss is TRL's own plus λ·term, the term on the hidden states of TRL's forward passes
    batch = _collate([data[i] for i in range(4)])
    student.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(student, dict(batch))
        term = trainer.last_terms["gauss_w2"]
        gkd = GKDTrainer.compute_loss(trainer, student, dict(batch))
    assert float(term) > 0
    torch.testing.assert_close(ours, gkd + 0.5 * term, rtol=1e-6, atol=1e-6)


def test_a_logit_term_is_refused_in_one_line(tmp_path):
    args = GKDConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, lmbda=0.0)
    data = datasets.Dataset.from_list([{"input_ids": list(range(1, LENGTH + 1))}] * 2)
    with pytest.raises(ValueError, match=r"term 'fkl' does not read hidden states") as e:
        KD2MGKDTrainer(model=_gpt2(1, 16, 0), teacher_model=_gpt2(2, 32, 1), args=args, train_dataset=data,
                       processing_class=_tokenizer(), data_collator=_collate, kd2m_terms="fkl")
    assert "\n" not in str(e.value)
