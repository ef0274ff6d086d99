"""Language-model inputs are never silently wrong: text identified by its content, tokenizers that
encode nothing refused, every hf: model causal, model options honoured or refused, a
save_pretrained teacher named as what it is, and every bad input one line ``kd2m: error: …``
with exit status 2 before anything trains."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")


from helpers import one_line_exit_2, python_docs_text, run_cli

TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2}
TINY_HF = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}


def _config(tmp_path, **extra):
    """A tiny lm grid: 16-token blocks, one-layer GPT-2s of width 16, one epoch, the CE student."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        python_docs_text(corpus)
    cfg = {"task": "lm", "dataset": f"text:{corpus}", "image_size": 16, "epochs": 1, "teacher_epochs": 1,
           "seeds": [0], "teacher_options": TINY, "student_options": TINY, "metrics": [], "baselines": ["ce"],
           "parallel": 1, "progress": False, "diagnostics": False, "out": str(tmp_path / "out"), **extra}
    path = tmp_path / "lm.yaml"
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))  # JSON is YAML
    return path


def _kd2m(capsys, *args):
    """``kd2m ARGS`` in this process: (exit status, stdout, stderr)."""
    return run_cli(args, capsys)


def _refused(capsys, tmp_path, *args, said=()):
    """``kd2m ARGS`` refuses in one line, exit 2, before any training; returns that line."""
    rc, _, err = _kd2m(capsys, *args)
    one_line_exit_2(rc, err, *said)
    assert not (tmp_path / "out" / "teacher").exists()
    return err


def _tokenizer_dir(path):
    """A real (word-level) tokenizer saved as transformers saves one: tokenizer.json and its config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["the", "a", "of", "to", "and", "is", "in", "it"]
    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)
    return path


# ---------------------------------------------------------------------- the text's identity
def test_edited_text_is_other_settings_not_the_old_teacher(tmp_path, capsys):
    cfg = _config(tmp_path)
    rc, _, err = _kd2m(capsys, "bench", cfg)
    assert rc == 0, err
    python_docs_text(tmp_path / "corpus.txt", chars=7000)            # the same name, other text
    rc, _, err = _kd2m(capsys, "bench", cfg)
    assert rc == 2 and "other settings" in err and "text" in err, err
    python_docs_text(tmp_path / "corpus.txt")                        # the first text again: the grid's runs are its own
    rc, _, err = _kd2m(capsys, "bench", cfg)
    assert rc == 0, err
    final = json.loads((tmp_path / "out/teacher/seed0/final.json").read_text())
    assert final["settings"]["text"].startswith("sha256:")


# ---------------------------------------------------------------------- tokenizers
def test_a_tokenizer_folder_without_tokenizer_files_is_refused_before_training(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=16, **TINY)).save_pretrained(tmp_path / "model")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i}: some words of text."}) + "\n" for i in range(1000)))
    cfg = _config(tmp_path, dataset=f"text:{docs}", tokenizer=str(tmp_path / "model"))
    _refused(capsys, tmp_path, "bench", cfg, said=("holds no tokenizer files", str(tmp_path / "model")))
    from kd2m.models.hf import load_hf_directory
    with pytest.raises(ValueError, match="holds no tokenizer files: give the data") as e:
        load_hf_directory(tmp_path / "model", 300)       # the hint no longer names the folder as the tokenizer
    assert "tokenizer: the same directory" not in str(e.value)


def test_a_corpus_that_encodes_to_too_few_tokens_is_refused_naming_the_numbers(tmp_path):
    from kd2m.data import build_dataset
    tok = _tokenizer_dir(tmp_path / "tok")
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "  \n "}) + "\n" * 2 + "".join(json.dumps({"text": " "}) + "\n"
                                                                       for _ in range(999)))
    with pytest.raises(ValueError, match=r"1000 documents encode to 0 tokens .* one block of 17"):
        build_dataset(f"text:{blank}", image_size=16, tokenizer=str(tok))   # end-of-document tokens alone
    short = tmp_path / "short.txt"
    short.write_text("the cat is in it " * 3)
    with pytest.raises(ValueError, match=r"1 documents encode to 15 tokens .* one block of 17"):
        build_dataset(f"text:{short}", image_size=16, tokenizer=str(tok))
    short.write_text("the cat is in it " * 20)            # 100 tokens and the end: 20 blocks of 5
    assert len(build_dataset(f"text:{short}", image_size=4, tokenizer=str(tok)).train) == 18


# ---------------------------------------------------------------------- reading text files
def test_text_files_read_as_json_lines_and_editors_write_them(tmp_path):
    from kd2m.data.text import read_documents
    lines = tmp_path / "sep.jsonl"
    lines.write_text(json.dumps({"text": "one\u2028two\u2029three"}, ensure_ascii=False) + "\n"
                     + json.dumps({"text": "next"}) + "\n", encoding="utf-8")
    assert read_documents(lines) == ["one\u2028two\u2029three", "next"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes("\ufeff".encode() + json.dumps({"text": "first"}).encode() + b"\n")
    assert read_documents(bom) == ["first"]
    (tmp_path / "bom.txt").write_bytes("\ufeffplain".encode())
    assert read_documents(tmp_path / "bom.txt") == ["plain"]
    folder = tmp_path / "folder"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "a.txt").write_text("A")
    (folder / "B.TXT").write_text("B")
    (folder / "C.JsonL").write_text(json.dumps({"text": "C"}) + "\n")
    (folder / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("old A")
    (folder / ".hidden.txt").write_text("hidden")
    assert read_documents(folder) == ["B", "C", "A"]      # sorted by name: upper case first


# ---------------------------------------------------------------------- causal models
def _saved_bert(path):
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=257, max_position_embeddings=16, **TINY_HF)).save_pretrained(path)
    return path


@pytest.mark.parametrize("model", ["hf:gpt2", "hf:llama", "hf:bert", "hf:roberta", "saved bert"])
def test_every_hf_model_kd2m_builds_is_causal(model, tmp_path):
    from kd2m.models import build_model
    from kd2m.models.hf import load_hf_directory
    torch.manual_seed(0)
    if model == "saved bert":
        lm = load_hf_directory(_saved_bert(tmp_path / "bert"), 257)
    else:
        lm = build_model(model, 257, 1, 16, **(TINY if model == "hf:gpt2" else TINY_HF))
    lm.eval()
    ids = torch.randint(0, 257, (2, 16))
    later = ids.clone()
    later[:, 10:] = torch.randint(0, 257, (2, 6))         # other tokens from position 10 on
    with torch.no_grad():
        a, b = lm(ids), lm(later)
    assert torch.equal(a[:, :10], b[:, :10])              # positions 0..9 do not see them
    assert not torch.equal(a[:, 10:], b[:, 10:])


def test_a_model_that_sees_later_tokens_is_refused_in_one_line(tmp_path, capsys):
    cfg = _config(tmp_path, teacher="hf:bert", teacher_options={**TINY_HF, "is_decoder": False})
    _refused(capsys, tmp_path, "bench", cfg, said=("not causal", "hf:bert"))


# ---------------------------------------------------------------------- model options
def test_n_positions_is_honoured_and_recorded_and_fewer_than_a_block_refused(tmp_path, capsys):
    cfg = _config(tmp_path, teacher_options={**TINY, "n_positions": 32})
    from kd2m.data import build_dataset
    from kd2m.harness.config import load_yaml
    from kd2m.training.build import build_teacher
    c = load_yaml(cfg).resolved()
    teacher = build_teacher(c, build_dataset(c.dataset, image_size=16), 0)
    assert teacher.config.n_positions == 32 and teacher.transformer.wpe.weight.shape[0] == 32
    cfg = _config(tmp_path, teacher_options={**TINY, "n_positions": 8})
    _refused(capsys, tmp_path, "bench", cfg, said=("n_positions 8", "16 tokens"))


@pytest.mark.parametrize("value, said", [("two", "must be an integer ≥ 1"), (-1, "got -1"), (2.5, "got 2.5")])
def test_a_bad_integer_model_option_is_one_line(value, said, tmp_path, capsys):
    cfg = _config(tmp_path, teacher_options={**TINY, "n_layer": value})
    _refused(capsys, tmp_path, "bench", cfg, said=("n_layer", said))


def test_hf_bert_without_options_builds_with_the_options_it_takes(tmp_path, capsys):
    from kd2m.harness.config import RunConfig
    c = RunConfig(task="lm", teacher="hf:bert").resolved()
    assert c.teacher_options == {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4}
    assert c.student_options == {"n_layer": 1, "n_embd": 64, "n_head": 2}   # GPT-2's own names stay
    rc, out, err = _kd2m(capsys, "bench", _config(tmp_path, teacher="hf:bert", teacher_options=None), "--dry-run")
    assert rc == 0 and "| teacher | hf:bert |" in out, err


# ---------------------------------------------------------------------- a save_pretrained teacher
def _saved_llama(path, vocab=257):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=16, num_key_value_heads=2,
                                 **TINY_HF)).save_pretrained(path)
    return path


def test_a_pretrained_teacher_folder_is_named_as_what_trains(tmp_path, capsys):
    folder = _saved_llama(tmp_path / "llama")
    cfg = _config(tmp_path, teacher_options=None, pretrained_teacher=str(folder), teacher_epochs=0,
                  baselines=["ce", "fkl"])
    rc, out, err = _kd2m(capsys, "bench", cfg, "--dry-run")
    assert rc == 0, err
    assert f"| teacher | hf:llama | {folder}/config.json |" in out and "hf:gpt2 |" not in out.split("| student |")[0]
    assert "'hidden_size': 16" in out and "n_embd" not in out.split("| student |")[0]
    rc, out, err = _kd2m(capsys, "bench", cfg)
    assert rc == 0, err
    settings = json.loads((tmp_path / "out/fkl/seed0/final.json").read_text())["settings"]
    assert settings["teacher"] == "hf:llama"
    assert settings["teacher_options"]["model_type"] == "llama" and settings["teacher_options"]["hidden_size"] == 16
    assert "teacher `hf:llama`" in (tmp_path / "out/results.md").read_text()
    assert json.loads((tmp_path / "out/config.json").read_text())["teacher"] == "hf:llama"


def test_options_or_another_model_type_with_a_pretrained_folder_are_refused(tmp_path, capsys):
    folder = _saved_llama(tmp_path / "llama")
    cfg = _config(tmp_path, pretrained_teacher=str(folder), teacher_epochs=0)     # GPT-2 teacher_options given
    _refused(capsys, tmp_path, "bench", cfg, said=("teacher_options", "would be ignored"))
    cfg = _config(tmp_path, teacher="hf:gpt2", teacher_options=None, pretrained_teacher=str(folder))
    _refused(capsys, tmp_path, "bench", cfg, said=("hf:llama", "give teacher: hf:llama"))


def test_a_truncated_weights_file_in_a_pretrained_folder_is_named(tmp_path, capsys):
    folder = _saved_llama(tmp_path / "llama")
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    cfg = _config(tmp_path, teacher_options=None, pretrained_teacher=str(folder), teacher_epochs=0)
    _refused(capsys, tmp_path, "bench", cfg, said=(str(weights),))


# ---------------------------------------------------------------------- what a language model is for
def test_unit_batch_on_text_is_refused_naming_the_valid_units(tmp_path, capsys):
    cfg = _config(tmp_path, metrics=["gauss_w2"], unit="batch", weight=0.1)
    _refused(capsys, tmp_path, "bench", cfg, said=("unit: batch", "tokens", "sequence"))
    cfg = _config(tmp_path, students={"mine": [{"term": "gauss_w2", "weight": 0.1}]})
    _refused(capsys, tmp_path, "bench", cfg, said=("students: mine", "unit"))


def test_an_hf_model_on_an_image_dataset_is_refused(tmp_path, capsys):
    cfg = _config(tmp_path, task=None, dataset="digits", image_size=None, teacher="hf:gpt2", teacher_options=None,
                  student_options=None)
    _refused(capsys, tmp_path, "bench", cfg, said=("teacher: hf:gpt2 is a language model", "text datasets"))


def test_a_pretrained_folder_with_fewer_positions_than_a_block_is_refused(tmp_path, capsys):
    folder = _saved_llama(tmp_path / "llama")                 # rotary positions: it would run past 16 silently
    cfg = _config(tmp_path, teacher_options=None, pretrained_teacher=str(folder), teacher_epochs=0, image_size=32)
    _refused(capsys, tmp_path, "bench", cfg, said=("holds 16 positions", "32 tokens", "--image-size 16"))


@pytest.mark.parametrize("model", ["hf:gpt2", "hf:llama"])
def test_every_token_of_the_vocabulary_trains(model):
    """No token of the data is the model's padding index (an embedding row frozen at zero)."""
    from kd2m.models import build_model
    torch.manual_seed(0)
    lm = build_model(model, 257, 1, 16, **(TINY if model == "hf:gpt2" else TINY_HF))
    ids = torch.arange(16).unsqueeze(0)                    # token 0 (the NUL byte; "!" of GPT-2's BPE) included
    torch.nn.functional.cross_entropy(lm(ids).flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    grad = lm.get_input_embeddings().weight.grad
    assert bool(grad[0].abs().sum() > 0) and bool(lm.get_input_embeddings().weight[0].abs().sum() > 0)
