"""The language-model task pinned by the values a user reads: perplexity and next-token accuracy
computed by hand on a tiny corpus, the positions the supervised loss ignores, the end-of-document
token between packed documents, the best epoch of a run, and a user's ``n_positions``.

Each test fails on a one-line bug that the rest of the suite let through: perplexity called
better when higher, token id 0 ignored instead of ``-100``, ignored positions counted, the
held-out NLL averaged per batch, the labels shifted a second time (as a Hugging Face LM head does
with its own ``labels``), documents packed with nothing between them, the user's ``n_positions``
overwritten by the block length."""
import itertools
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from kd2m import tasks
from kd2m.data import build_dataset
from kd2m.data.text import END_OF_DOCUMENT, ByteTokenizer, pack

pytest.importorskip("transformers")

LM = tasks.get("lm")
V = 257  # the byte vocabulary: 256 bytes and the end-of-document token


class Bigram(nn.Module):
    """Logits ``table[x]`` at every position: a model whose every prediction the test can write out."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.float(), requires_grad=False)

    def forward(self, x):
        return self.table[x]


def _table(seed=0):
    return 3 * torch.randn(V, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _nll(table, x, y):
    """−log softmax(table[x])[y] for one (input, next) token pair, in float64: z_y − log Σ_v exp z_v."""
    z = table[x].double()
    return float(torch.logsumexp(z, 0) - z[y])


def _corpus(tmp_path, n_docs=30):
    """Documents of 7 bytes + the end-of-document token: one block of 8 tokens each at image_size 7."""
    words = ["kd2m is", "a small", "library", "of maps."]
    docs = [words[i % 4][:7].ljust(7, "_") for i in range(n_docs)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


# ------------------------------------------------------------------------------- task's direction
def test_a_lower_perplexity_is_the_better_one():
    assert LM.primary == "test_ppl" and LM.best_key == "best_ppl"
    assert LM.better(12.5, 30.0) and not LM.better(30.0, 12.5)
    assert tasks.get("classification").better(0.9, 0.8)


def test_a_runs_best_perplexity_is_its_lowest_epoch(tmp_path):
    """final.json's best_ppl / best_epoch are those of the epoch with the lowest test_ppl in the log
    (a task calling a higher perplexity better reports the worst epoch as the best)."""
    from kd2m.harness.config import RunConfig
    from kd2m.harness.trainer import Trainer
    from kd2m.training.build import build_student
    path, _ = _corpus(tmp_path, 40)
    cfg = RunConfig(task="lm", dataset=f"text:{path}", image_size=7, epochs=3, seeds=[0], baselines=["ce"], metrics=[],
                    student_options={"n_layer": 1, "n_embd": 16, "n_head": 2}, batch_size=8, lr=3e-3,
                    progress=False, diagnostics=False).resolved()
    bundle = build_dataset(cfg.dataset, image_size=7)
    result = Trainer(build_student(cfg, bundle, 0), bundle, cfg, cfg.methods()[0], 0, tmp_path / "ce",
                     torch.device("cpu")).fit()
    ppl = [json.loads(line)["test_ppl"] for line in (tmp_path / "ce/log.jsonl").read_text().splitlines()]
    assert len(ppl) == 3 and len(set(ppl)) == 3   # the epochs differ: choosing among them means something
    assert result["best_ppl"] == min(ppl) and result["best_epoch"] == 1 + ppl.index(min(ppl))
    assert result["test_ppl"] == ppl[-1]


# -------------------------------------------------------------------------------- supervised loss
def test_the_supervised_loss_ignores_the_minus_100_positions_and_only_those():
    """Token id 0 is a real token (the NUL byte; a tokenizer's first id): its position counts. The
    loss is the mean NLL over the kept positions, each against its own target (no second shift)."""
    table = _table(1)
    x = torch.tensor([[5, 0, 7, 9], [0, 3, 3, 1]])
    y = torch.tensor([[0, 7, -100, 0], [3, -100, 1, 0]])
    logits = Bigram(table)(x)
    kept = [(int(x[b, i]), int(y[b, i])) for b in range(2) for i in range(4) if y[b, i] != -100]
    assert len(kept) == 6 and sum(t == 0 for _, t in kept) == 3
    want = sum(_nll(table, a, t) for a, t in kept) / len(kept)
    got = LM.supervised_loss(logits, y)
    assert float(got) == pytest.approx(want, rel=1e-6)
    s_view, labels = LM.term_view(logits, y)
    assert s_view.shape == (8, V) and labels.tolist() == y.reshape(-1).tolist()


# ------------------------------------------------------------------------------------- evaluation
def test_held_out_perplexity_is_exp_of_the_per_token_mean_over_uneven_batches(tmp_path):
    """Three held-out blocks of 7 positions in batches of 2 and 1: perplexity = exp(Σ NLL / 21).
    A mean of the two per-batch means would weigh the lone block twice as much."""
    path, docs = _corpus(tmp_path)
    bundle = build_dataset(f"text:{path}", image_size=7)
    assert len(bundle.test) == 3                                   # blocks 9, 19, 29
    table = _table(2)
    pairs = []
    for i in (9, 19, 29):                                          # block i is document i and its end token
        ids = list(docs[i].encode()) + [END_OF_DOCUMENT]
        pairs += list(itertools.pairwise(ids))
    nll = [_nll(table, a, b) for a, b in pairs]
    want = sum(nll) / len(nll)
    acc = sum(int(table[a].argmax()) == b for a, b in pairs) / len(pairs)
    got = LM.evaluate(Bigram(table), DataLoader(bundle.test, batch_size=2), torch.device("cpu"))
    assert list(got) == ["test_ppl", "test_acc", "test_nll"]
    assert got["test_nll"] == pytest.approx(want, rel=1e-6)
    assert got["test_ppl"] == pytest.approx(math.exp(want), rel=1e-6)
    assert got["test_acc"] == pytest.approx(acc)
    per_batch = (sum(nll[:14]) / 14 + sum(nll[14:]) / 7) / 2
    assert abs(per_batch - want) > 1e-3                             # the data tells the two apart


def test_next_token_accuracy_and_perplexity_count_only_the_kept_positions():
    """A model right at 3 of the 5 kept positions and at every ignored one: accuracy 3/5, and the
    NLL averaged over those 5 (not 8)."""
    table = torch.zeros(V, V, dtype=torch.float64)
    for a in range(V):
        table[a, (a + 1) % V] = 4.0                                 # predicts the next byte value
    x = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    y = torch.tensor([[11, 99, -100, 14], [-100, 22, 50, -100]])   # right at 11, 22, 14
    got = LM.evaluate(Bigram(table), [(x[:1], y[:1]), (x[1:], y[1:])], torch.device("cpu"))
    kept = [(a, t) for a, t in zip(x.reshape(-1).tolist(), y.reshape(-1).tolist()) if t != -100]
    want = sum(_nll(table, a, t) for a, t in kept) / 5
    assert got["test_acc"] == pytest.approx(3 / 5)
    assert got["test_nll"] == pytest.approx(want, rel=1e-6)
    assert got["test_ppl"] == pytest.approx(math.exp(want), rel=1e-6)


def test_a_model_that_predicts_each_next_token_scores_perfectly_on_the_packed_blocks(tmp_path):
    """y is already the next token of x: a model that knows the successor of every token of the
    corpus is right everywhere (accuracy 1) with the loss it is trained on near 0. A second shift
    (HF's LM head shifts its ``labels`` itself) would score it against the token after next."""
    (tmp_path / "c.txt").write_text("abcdefg" * 60)     # 60 blocks "abcdefg": x = "abcdef", y = "bcdefg"
    bundle = build_dataset(f"text:{tmp_path / 'c.txt'}", image_size=6)
    table = torch.full((V, V), -20.0)
    for a, b in zip("abcdefg", "bcdefga"):
        table[ord(a), ord(b)] = 20.0
    model = Bigram(table)
    got = LM.evaluate(model, DataLoader(bundle.test, batch_size=4), torch.device("cpu"))
    assert got["test_acc"] == 1.0 and got["test_ppl"] == pytest.approx(1.0, abs=1e-6)
    x, y = next(iter(DataLoader(bundle.train, batch_size=8)))
    assert float(LM.supervised_loss(model(x), y)) < 1e-6


# --------------------------------------------------------------------------------------- packing
def test_documents_are_packed_with_the_end_of_document_token_between_them(tmp_path):
    assert pack(["ab", "cd", "e"], ByteTokenizer(), 2).tolist() == [[97, 98, 256], [99, 100, 256]]
    path, docs = _corpus(tmp_path, 20)
    bundle = build_dataset(f"text:{path}", image_size=7)
    assert (len(bundle.train), len(bundle.test)) == (18, 2)
    x, y = bundle.train[4]                                          # block 4 is document 4
    assert x.tolist() == list(docs[4].encode()) and y.tolist() == list(docs[4].encode())[1:] + [END_OF_DOCUMENT]
    x, y = bundle.test[0]                                           # block 9
    assert bytes(x.tolist()).decode() == docs[9] and int(y[-1]) == END_OF_DOCUMENT


# ----------------------------------------------------------------------------------- model options
def test_a_user_given_n_positions_reaches_the_built_model():
    """``n_positions: 32`` with blocks of 16: the model holds 32 positions and runs on 32 tokens."""
    from kd2m.models import build_model
    torch.manual_seed(0)
    lm = build_model("hf:gpt2", V, 1, 16, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    assert lm.config.n_positions == 32 and lm.transformer.wpe.weight.shape == (32, 16)
    assert lm(torch.randint(0, V, (1, 32))).shape == (1, 32, V)
    default = build_model("hf:gpt2", V, 1, 16, n_layer=1, n_embd=16, n_head=2)
    assert default.config.n_positions >= 16
