"""Pretrained teachers from a file: a GGUF file (llama.cpp's format) loaded with transformers and
dequantised, its metadata recorded as the teacher's config and its tokenizer the data's; a
pretrained teacher that no epoch trains (GGUF, save_pretrained folder or weights file) referenced
by its content digest instead of a ``model.pt`` copy per seed, and read back from that file by
resume, ``kd2m bound`` and ``kd2m report``; bad GGUF inputs one line ``kd2m: error: …``, exit 2,
before anything trains.

The GGUF files are written here, in the real format, with the ``gguf`` package's writer: a tiny
random Llama (2 layers, width 16) with a byte-level BPE tokenizer of 262 tokens in its metadata,
as llama.cpp's converter writes one (``tokenizer.ggml.model = gpt2``, tokens, merges, token types)."""
import doctest
import json

import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from helpers import one_line_exit_2, python_docs_text, run_cli  # noqa: E402 (after the optional imports' skips)

TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2}
MERGES = ["Ġ t", "e r", "Ġ a", "i n", "o n"]
EOS = "<|endoftext|>"
VOCAB = 256 + len(MERGES) + 1      # bytes, one token per merge, the end of text: 262


def write_gguf(path, arch="llama", layers=2, hidden=16, heads=2, ff=32, context=64, seed=0):
    """A loadable GGUF causal LM of random weights (float32 tensors) with its tokenizer: what a
    converter writes for a Llama, in miniature. Returns ``path``."""
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    rng = np.random.default_rng(seed)
    tokens = [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + [EOS]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smaug-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])      # 3: control (the end of text)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)

    def tensor(name, *shape, ones=False):
        w.add_tensor(name, np.ones(shape, np.float32) if ones else (0.1 * rng.standard_normal(shape)).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    tensor("output.weight", len(tokens), hidden)
    tensor("output_norm.weight", hidden, ones=True)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden, ones=True)
        tensor(f"blk.{i}.ffn_norm.weight", hidden, ones=True)
        for part in ("q", "k", "v", "output"):
            tensor(f"blk.{i}.attn_{part}.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _kd2m(capsys, *args):
    """``kd2m ARGS`` in this process: (exit status, stdout, stderr)."""
    return run_cli(args, capsys)


def _lm_run(tmp_path, teacher, *extra, seeds="0,1"):
    """``kd2m run`` of a tiny lm grid distilling from the pretrained ``teacher`` (no teacher epoch)."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        python_docs_text(corpus)
    return ["run", "--task", "lm", "--dataset", f"text:{corpus}", "--pretrained-teacher", teacher,
            "--teacher-epochs", "0", "--baselines", "ce,fkl", "--metrics", "", "--epochs", "1", "--seeds", seeds,
            "--image-size", "16", "--batch-size", "16", "--parallel", "1", "--no-progress",
            "--out", tmp_path / "out", *extra]


def _refused(capsys, tmp_path, *args, said=()):
    """``kd2m ARGS`` refuses in one line, exit 2, before any training; returns that line."""
    rc, _, err = _kd2m(capsys, *args)
    one_line_exit_2(rc, err, *said)
    assert not (tmp_path / "out" / "teacher").exists()
    return err


def _sha256(path):
    import hashlib
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- a GGUF teacher, end to end
def test_a_gguf_teacher_runs_end_to_end_with_its_config_its_tokenizer_and_no_copy_per_seed(tmp_path, capsys):
    teacher = write_gguf(tmp_path / "tiny.gguf")
    rc, out, err = _kd2m(capsys, *_lm_run(tmp_path, teacher))
    assert rc == 0, err
    run = tmp_path / "out"
    config = json.loads((run / "config.json").read_text())
    assert config["teacher"] == "hf:llama" and config["tokenizer"] == str(teacher)   # the file's own tokenizer
    options = config["teacher_options"]
    assert options["model_type"] == "llama" and options["hidden_size"] == 16 and options["num_hidden_layers"] == 2
    assert options["vocab_size"] == VOCAB and "quantization_config" not in options
    for seed in (0, 1):
        teacher_run = run / f"teacher/seed{seed}"
        assert not (teacher_run / "model.pt").exists()         # no copy of the untrained teacher per seed
        final = json.loads((teacher_run / "final.json").read_text())
        assert final["weights"] == {"file": str(teacher), "identity": _sha256(teacher), "dtype": "float32",
                                    "stored_as": "GGUF: F32 ×21, dequantised"}
        assert final["settings"]["model"] == "hf:llama" and final["settings"]["model_options"] == options
        assert 1 < final["test_ppl"] < 2 * VOCAB                 # a random 262-token model: about its vocabulary
        assert (run / f"fkl/seed{seed}/model.pt").exists()      # students trained: their weights are theirs
    ppl = {json.loads((run / f"teacher/seed{s}/final.json").read_text())["test_ppl"] for s in (0, 1)}
    assert len(ppl) == 1                                         # one teacher, whatever the seed
    # the same command again: every run is found finished, the teacher from the file it references
    rc, out, err = _kd2m(capsys, *_lm_run(tmp_path, teacher))
    assert rc == 0 and out.count("(finished earlier)") == 6, err


def test_an_untrained_gguf_teacher_is_loaded_once_for_the_checks_and_every_seed(tmp_path, capsys, monkeypatch):
    import kd2m.training.build as build
    loads = []
    real = build.load_hf_pretrained
    monkeypatch.setattr(build, "load_hf_pretrained", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    teacher = write_gguf(tmp_path / "tiny.gguf")
    rc, _, err = _kd2m(capsys, *_lm_run(tmp_path, teacher, seeds="0,1,2"))
    assert rc == 0, err
    assert loads == [str(teacher)]                             # not once for the checks and once per seed


def test_an_untrained_teacher_on_text_builds_its_top_k_table_once_for_every_seed(tmp_path, capsys, monkeypatch):
    # the same weights on the same blocks give the same table whatever the seed: three seeds, one build
    import kd2m.training.teacher as teacher_outputs
    builds = []
    real = teacher_outputs.build_teacher_cache
    monkeypatch.setattr(teacher_outputs, "build_teacher_cache", lambda *a, **k: builds.append(k["topk"]) or real(*a, **k))
    teacher = write_gguf(tmp_path / "tiny.gguf")
    rc, _, err = _kd2m(capsys, *_lm_run(tmp_path, teacher, "--teacher-topk", "8", seeds="0,1,2"))
    assert rc == 0, err
    assert builds == [8]


def test_a_gguf_tokenizer_can_be_named_and_the_card_says_how_the_teacher_computes(tmp_path, capsys):
    teacher = write_gguf(tmp_path / "tiny.gguf")
    rc, out, err = _kd2m(capsys, *_lm_run(tmp_path, teacher, "--tokenizer", teacher, seeds="0"))
    assert rc == 0, err
    assert json.loads((tmp_path / "out/teacher/seed0/final.json").read_text())["settings"]["tokenizer"] \
        == _sha256(teacher)
    config = tmp_path / "lm.yaml"
    config.write_text(json.dumps({"task": "lm", "dataset": f"text:{tmp_path / 'corpus.txt'}", "image_size": 16,
                                  "pretrained_teacher": str(teacher), "teacher_epochs": 0, "metrics": [],
                                  "baselines": ["ce", "fkl"], "out": str(tmp_path / "card")}))
    rc, out, err = _kd2m(capsys, "bench", config, "--dry-run")
    assert rc == 0, err
    assert f"| teacher | hf:llama | {teacher} (its metadata) |" in out
    assert f"| pretrained_teacher | {teacher} (GGUF, stored as F32 ×21; dequantised, computes in float32) |" in out
    assert f"| tokenizer | {teacher} | {teacher} (its own tokenizer) |" in out


# ---------------------------------------------------------------------- no per-seed copy, read back
def _saved_llama(path, vocab=257):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=16, num_key_value_heads=2,
                                 num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                 intermediate_size=32)).save_pretrained(path)
    return path


def test_a_pretrained_folder_teacher_is_referenced_not_copied_per_seed(tmp_path, capsys):
    folder = _saved_llama(tmp_path / "llama")
    rc, _, err = _kd2m(capsys, *_lm_run(tmp_path, folder))
    assert rc == 0, err
    for seed in (0, 1):
        final = json.loads((tmp_path / f"out/teacher/seed{seed}/final.json").read_text())
        assert not (tmp_path / f"out/teacher/seed{seed}/model.pt").exists()
        assert final["weights"]["file"] == str(folder) and final["weights"]["dtype"] == "float32"
        assert final["weights"]["identity"] == final["settings"]["pretrained"]   # the digest the settings check


def _digits_teacher(path, seed=0):
    from kd2m.models import build_model
    torch.manual_seed(seed)
    torch.save(build_model("digits_cnn", 10, 1, 8).state_dict(), path)
    return path


def test_bound_and_report_read_an_untrained_teacher_from_the_file_it_references(tmp_path, capsys):
    teacher = _digits_teacher(tmp_path / "t.pt")
    out = tmp_path / "out"
    rc, _, err = _kd2m(capsys, "run", "--teacher", "digits_cnn", "--pretrained-teacher", teacher, "--teacher-epochs",
                       "0", "--epochs", "1", "--seeds", "1", "--baselines", "ce", "--metrics", "cw2",
                       "--no-progress", "--out", out)
    assert rc == 0, err
    assert not (out / "teacher/seed0/model.pt").exists()
    rc, _, err = _kd2m(capsys, "bound", out, "--samples", "64")
    assert rc == 0, err
    pairs = json.loads((out / "bound.json").read_text())["pairs"]
    accuracy = json.loads((out / "teacher/seed0/final.json").read_text())["test_acc"]
    assert {p["method"] for p in pairs} == {"ce", "cw2"}
    for pair in pairs:                                           # the referenced teacher, as the grid scored it
        assert pair["risk_teacher"] == pytest.approx(1 - accuracy, abs=1e-9)
    # the file replaced under the same name: refused in one line, never another teacher scored
    _digits_teacher(teacher, seed=1)
    rc, _, err = _kd2m(capsys, "bound", out, "--samples", "64")
    assert rc == 2 and err.count("\n") == 1 and "changed since the run" in err and str(teacher) in err, err


# ---------------------------------------------------------------------- bad GGUF inputs
def test_a_gguf_of_an_architecture_transformers_cannot_load_is_refused(tmp_path, capsys):
    teacher = write_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    _refused(capsys, tmp_path, *_lm_run(tmp_path, teacher), said=(str(teacher), "'rwkv6'", "cannot load"))


@pytest.mark.parametrize("damage", ["half", "header", "junk"])
def test_a_corrupt_or_truncated_gguf_is_refused_naming_the_file(damage, tmp_path, capsys):
    teacher = write_gguf(tmp_path / "tiny.gguf")
    data = teacher.read_bytes()
    teacher.write_bytes({"half": data[:len(data) // 2], "header": data[:2000],
                         "junk": b"not a model " * 100}[damage])
    _refused(capsys, tmp_path, *_lm_run(tmp_path, teacher), said=(str(teacher), "corrupt or truncated"))


def test_a_tokenizer_of_another_vocabulary_is_refused_naming_both_sizes(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["the", "a", "of", "to", "and", "is", "in", "it"]
    tok = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path / "tok")
    teacher = write_gguf(tmp_path / "tiny.gguf")
    _refused(capsys, tmp_path, *_lm_run(tmp_path, teacher, "--tokenizer", tmp_path / "tok"),
             said=(str(teacher), f"{VOCAB} tokens", "tokenizer 10"))


def test_a_missing_gguf_file_is_refused(tmp_path, capsys):
    _refused(capsys, tmp_path, *_lm_run(tmp_path, tmp_path / "gone.gguf"), said=("gone.gguf", "no such GGUF file"))


# ---------------------------------------------------------------------- the module's own example
def test_the_hf_module_docstring_example_runs_as_written():
    from kd2m.models import hf
    result = doctest.testmod(hf, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0
