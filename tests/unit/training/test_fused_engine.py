"""The engine's fused student head: a causal LM's training step computes its cross-entropy and
token divergences from its last hidden states and output layer (kd2m.training.head), equal in
value and gradient to the step that builds its logits, never running its output layer, while
the held-out evaluation, the terms that need the full logits and ``weight: auto`` stay as they were."""
import pytest
import torch
import torch.nn.functional as F

import kd2m
from kd2m.losses.sparse_teacher import SparseTeacher
from kd2m.models import build_model

pytest.importorskip("transformers")

V, L = 29, 10
TERMS = [{"term": "jsd", "weight": 0.7, "options": {"beta": 0.3}},
         {"term": "gauss_w2", "unit": "tokens", "weight": 0.2},
         {"term": "fkl", "weight": 1.1, "options": {"temperature": 2.0}}]


def _lm(kind: str, seed: int, width: int = 16):
    torch.manual_seed(seed)
    if kind == "gpt2":  # tied embeddings: the output layer's weight is the token embedding
        return build_model("hf:gpt2", V, 1, L, n_layer=1, n_embd=width, n_head=2).double()
    return build_model("hf:llama", V, 1, L, hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=2 * width).double()


def _batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (3, L), generator=g)
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100  # the last position has no next token
    y[0, :2] = -100
    return x, y


def _step(kind, fused, terms=TERMS):
    """One Distiller step (student float64): its loss, each term, each parameter's gradient."""
    student, teacher = _lm(kind, 0), _lm(kind, 1, width=24)
    x, y = _batch()
    d = kd2m.Distiller(student, teacher, terms, example=x[:2], task="lm", num_classes=V, fused_head=fused)
    out = d(x, y)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return d, out, grads


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_fused_step_equals_the_step_on_logits_in_value_and_gradient(kind):
    d, fused, g_fused = _step(kind, True)
    assert d.step.head is not None and fused.logits is None  # the fused head ran
    _, plain, g_plain = _step(kind, False)
    assert plain.logits.shape == (3, L, V)
    # the oracle of the supervised part, written out: mean over kept positions of −log softmax
    z = plain.logits.detach().reshape(-1, V)
    t = _batch()[1].reshape(-1)
    keep = t != -100
    ce = -(z.log_softmax(-1)[keep].gather(1, t[keep, None])).mean()
    assert fused.ce.item() == pytest.approx(float(ce), rel=1e-12, abs=0)
    assert fused.loss.item() == pytest.approx(plain.loss.item(), rel=1e-12, abs=0)
    for key in plain.terms:
        assert fused.terms[key].item() == pytest.approx(plain.terms[key].item(), rel=1e-12, abs=1e-14)
    assert set(g_fused) == set(g_plain)
    for name in g_plain:
        assert torch.allclose(g_fused[name], g_plain[name], rtol=1e-10, atol=1e-13), name


def test_the_fused_step_never_runs_the_output_layer_and_evaluation_still_reads_logits():
    d, _, _ = _step("gpt2", True)
    student = d.student
    calls = []
    hook = student.lm_head.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    x, y = _batch()
    d(x, y).loss.backward()
    assert calls == []  # no (B, L, V) logits in the training step
    figures = kd2m.tasks.get("lm").evaluate(student, [(x, y)], torch.device("cpu"))
    hook.remove()
    assert calls == [(3, L, V)]  # the held-out evaluation builds them, as before
    with torch.no_grad():
        z = student(x).reshape(-1, V)
    nll = F.cross_entropy(z, y.reshape(-1), ignore_index=-100)
    assert figures["test_nll"] == pytest.approx(float(nll), rel=1e-6)  # evaluation reads float32 logits


def test_a_term_on_the_full_logits_keeps_the_plain_step():
    d, out, _ = _step("gpt2", True, terms=[{"term": "jsd"}, {"term": "kd", "weight": 0.5}])
    assert d.step.head is None and out.logits.shape == (3, L, V)


def test_weight_auto_calibrates_the_same_on_the_fused_head():
    """Calibration takes the gradient of CE and of each term apart: the fused head gives each its own."""
    x, y = _batch()
    data = list(zip(x, y)) * 2
    scales = []
    for fused in (True, False):
        student, teacher = _lm("gpt2", 0), _lm("gpt2", 1, width=24)
        terms = [{"term": "jsd", "weight": "auto"}, {"term": "gauss_w2", "unit": "tokens", "weight": "auto"},
                 {"term": "fkl", "weight": 1.0}]
        d = kd2m.Distiller(student, teacher, terms, example=x[:2], task="lm", num_classes=V, fused_head=fused)
        scales.append(d.calibrate(data, 3))
    assert scales[0] == pytest.approx(scales[1], rel=1e-10)
    assert scales[0][2] == 1.0 and all(s > 0 for s in scales[0])


def test_the_fused_step_reads_a_sparse_teacher_as_the_divergences_do():
    """With a SparseTeacher the fused divergences are the registered terms' ghost-token values."""
    student, teacher = _lm("llama", 0), _lm("llama", 1, width=24)
    x, y = _batch()
    d = kd2m.Distiller(student, teacher, [{"term": "jsd"}, {"term": "tvd"}], example=x[:2], task="lm",
                       num_classes=V)
    with torch.no_grad():
        sparse = SparseTeacher.from_logits(teacher(x), 5)
    hidden = student(x, last_hidden=True)
    ce, values = d.step.head(hidden, y.reshape(-1), sparse, None)
    z = student(x).reshape(-1, V)
    for k, name in enumerate(["jsd", "tvd"]):
        want = kd2m.losses.get(name)(student_logits=z, teacher_logits=sparse, labels=y.reshape(-1))
        assert float(values[k]) == pytest.approx(float(want), rel=1e-12)
    assert float(ce) == pytest.approx(float(F.cross_entropy(z, y.reshape(-1), ignore_index=-100)), rel=1e-12)


def test_the_head_is_fused_only_where_the_logits_are_the_output_layer_of_the_hidden_states():
    from kd2m.models.hf_logits import fused_output_layer
    torch.manual_seed(0)
    short = build_model("hf:gpt2", V, 1, 4, n_layer=1, n_embd=8, n_head=2)  # 4 positions: the probe fits them
    assert fused_output_layer(short) is short.lm_head
    shifted = _lm("llama", 0)
    shifted.register_forward_hook(lambda m, i, out: out + 1.0)  # something after the head: not fusable
    assert fused_output_layer(shifted) is None
    assert fused_output_layer(torch.nn.Linear(3, V)) is None  # not an hf: model


def test_the_gradient_taken_in_the_forward_is_exact_for_its_weights_and_for_any_other():
    """fused_head_terms(weights=…) takes the weighted loss's gradient in its one pass; another
    combination (CE alone, as weight: auto asks) is rebuilt in the backward: both exact."""
    from kd2m.losses.fused_head import TokenDivergence, fused_head_terms
    g = torch.Generator().manual_seed(0)
    h = torch.randn(19, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (19,), generator=g)
    labels[:2] = -100
    teacher = 2 * torch.randn(19, V, generator=g, dtype=torch.float64)
    divs = [TokenDivergence("jsd", 1.0, 0.3), TokenDivergence("rkl", 2.0)]
    z = h @ w.T
    plain = [F.cross_entropy(z, labels, ignore_index=-100)] + [
        kd2m.losses.get(d.kind, temperature=d.temperature, **({"beta": d.beta} if d.kind == "jsd" else {}))(
            student_logits=z, teacher_logits=teacher, labels=labels) for d in divs]
    for combination in ([0.5, 0.7, 1.3], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]):
        want = torch.autograd.grad(sum(c * v for c, v in zip(combination, plain)), (h, w), retain_graph=True)
        ce, values = fused_head_terms(h, w, labels, teacher, divs, weights=[0.5, 0.7, 1.3], chunk_size=4)
        got = torch.autograd.grad(sum(c * v for c, v in zip(combination, [ce, *values])), (h, w))
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), combination
