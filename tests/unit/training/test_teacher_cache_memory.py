"""A large vocabulary's logits bound the held-out and teacher-cache batches: 512 blocks of 128
tokens at V = 49 152 would be 12 GiB of logits in one batch (the machine's memory, killed)."""
import torch
from torch import nn

import kd2m.data.registry as registry
from kd2m.data.registry import DataBundle, eval_batch_size, logits_batch_size
from kd2m.data.text import TokenBlocks
from kd2m.training.teacher_cache import FixedViews, build_teacher_cache


def test_eval_batches_keep_a_large_vocabulary_s_logits_under_the_budget():
    blocks = TokenBlocks(torch.zeros(4, 129, dtype=torch.long))
    text = DataBundle(blocks, blocks, num_classes=49152, in_channels=1, image_size=128, name="t", task="lm")
    assert eval_batch_size(text) == 256 * 2**20 // (4 * 128 * 49152) == 10
    small = DataBundle(blocks, blocks, num_classes=257, in_channels=1, image_size=64, name="t", task="lm")
    assert eval_batch_size(small) == 512                                   # the byte benchmark: as before
    images = DataBundle(blocks, blocks, num_classes=100, in_channels=3, image_size=32, name="c")
    assert eval_batch_size(images) == 512
    assert logits_batch_size(10**12) == 1                                   # never zero


class _TinyLM(nn.Module):
    """Logits (B, L, V) from a token embedding; records each batch's size."""

    def __init__(self, vocab):
        super().__init__()
        self.embed, self.head, self.batches = nn.Embedding(vocab, 4), nn.Linear(4, vocab), []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.head(self.embed(x))


def test_the_teacher_cache_builds_in_batches_whose_logits_fit_the_budget(monkeypatch):
    monkeypatch.setattr(registry, "EVAL_LOGITS_MIB", 1)                    # 262 144 floats a batch
    blocks = TokenBlocks(torch.randint(0, 8192, (7, 17)))                  # 16 positions × 8192 = 131 072 an item
    teacher = _TinyLM(8192)
    cache = build_teacher_cache(teacher, FixedViews(blocks, 1, 0), "embed", torch.device("cpu"), raw=True, topk=4)
    assert teacher.batches == [1, 2, 2, 2, 1]                              # the shape probe, then 2 items at most
    ids = cache.lookup(torch.arange(7))[1]
    full = torch.log_softmax(teacher.head(teacher.embed(blocks.blocks[:, :-1])), -1).topk(4, -1)
    torch.testing.assert_close(ids.logprobs, full.values.reshape(-1, 4))
