"""Training throughput: plain student steps vs distillation steps per loss term, as ratios in one run.

    python benchmarks/throughput.py                       # CPU, CIFAR-size ResNet-18 student / ResNet-34 teacher
    python benchmarks/throughput.py --device cuda --amp bf16 --channels-last
    python benchmarks/throughput.py --student digits_mlp --teacher digits_cnn --image-size 8 --channels 1 \\
        --baselines kd,dkd,pkt,rkd,crd --spatial ""        # an MLP has no feature maps

Every configuration is a term of :mod:`kd2m.losses` (``--metrics``: the KD²M distances;
``--baselines``: the field's terms; ``--spatial``: distances with ``unit="spatial"``, one sample
per position of each image's last feature map), built and fed as the training engine does it
(:func:`kd2m.training.binding.bind_terms`, the engine's feature taps, teacher outputs and its
one :class:`~kd2m.training.step.Step`), added to CE with λ = 1e-4 (the cost of a step does not depend on λ; a small λ
keeps the shared student finite over the few steps). All configurations run the same number of
optimizer steps on the same synthetic batch (random images, so data loading is excluded),
interleaved round-robin over several rounds so drift on a shared machine hits all of them
alike; the median images/s per configuration is reported with its ratio to the plain (CE-only)
student. Two reference rows separate what a term costs from what the teacher's forward pass
costs (any online distillation pays it): ``ce+teacher`` (CE plus a teacher forward, no term)
and each term.

``--teacher-mode cached`` rows measure the steady state of ``--teacher-cache K`` (offline
distillation): the teacher's pooled features and logits are looked up by key from a
precomputed table of ``--num-data`` rows, as the engine does, instead of being computed every
step. The one-off cost of filling the table (K teacher passes over the training set) is not
in these rows. Terms on feature maps (``fitnet``, ``at``, ``nst``, and every ``--spatial`` row)
read the teacher's maps, which the cache does not store: they run online only. The batch's
keys are its samples' indices in that table; CRD's memory bank has one row per table row
(``num_data``), so at the default 50 000 (CIFAR's training set) it draws its full 16 384
negatives per sample, as in training.

The goal column is the target of the cached rows: ≥ 0.9× plain for every logit and
pooled-feature term, ≥ 0.8× for exact OT; CRD's cost is reported, not held to it. Online rows
pay the teacher's forward; compare them with the × CE+teacher column.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from table_output import emit

from kd2m import losses, tasks
from kd2m.features import PENULTIMATE
from kd2m.models import build_model
from kd2m.training.binding import Taps, bind_terms, wanted_layers
from kd2m.training.methods import Method, TermConfig
from kd2m.training.step import Step
from kd2m.training.teacher import CachedTeacher, OnlineTeacher
from kd2m.training.teacher_cache import TeacherCache

DEFAULT_METRICS = "w2,cw2,jw2,gauss_w2,gauss_cw2,gauss_kl,mmd_rbf,sliced_w2,sinkhorn"
DEFAULT_BASELINES = "kd,dkd,dist,wkd_l,pkt,rkd,crd,fitnet,at,nst"
EXACT_OT = {"w2", "cw2", "jw2", "gw2"}
WEIGHT = 1e-4  # λ of every term (see the module docstring)


def term_configs(metrics: str, baselines: str, spatial: str) -> list[tuple[str, TermConfig]]:
    """``(row name, TermConfig)`` for each term asked for; ValueError naming an unknown term.

    A spatial row takes the distance's diagonal covariance when it has that option (a full c×c
    covariance per image is c³ work per image: at c = 512 it would measure the eigensolver)."""
    out = []
    for name in [m for m in f"{metrics},{baselines}".split(",") if m]:
        losses.spec(name)
        out.append((name, TermConfig(name, WEIGHT)))
    for name in [m for m in spatial.split(",") if m]:
        if losses.spec(name).family != "kd2m":
            raise ValueError(f"--spatial: {name!r} is not a KD²M distance; unit='spatial' is an option of those")
        options = (("diagonal", True),) if "diagonal" in losses.spec(name).options else ()
        label = f"{name} (spatial{', diagonal' if options else ''})"
        out.append((label, TermConfig(name, WEIGHT, options=options, unit="spatial")))
    return out


def make_step(net, teacher_out, s_taps, terms, opt, x, y, keys, amp_dtype):
    """One optimizer step as :meth:`kd2m.harness.trainer.Trainer._epoch` takes it, through the engine's own
    :class:`~kd2m.training.step.Step`; ``teacher_out`` is None (CE only), an
    :class:`OnlineTeacher` (a forward per step) or a :class:`CachedTeacher` (lookup)."""
    engine_step = Step(net, terms, tasks.get("classification"), teacher_out=teacher_out, s_taps=s_taps,
                       device=x.device, amp=amp_dtype)
    lam = [b.config.weight for b in terms]

    def step():
        loss, _ = engine_step.loss(engine_step.forward(x, y, keys), lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="cifar_resnet18")
    p.add_argument("--teacher", default="cifar_resnet34")
    p.add_argument("--metrics", default=DEFAULT_METRICS, help="KD²M distances (comma list; '' for none)")
    p.add_argument("--baselines", default=DEFAULT_BASELINES, help="baseline terms (comma list; '' for none)")
    p.add_argument("--spatial", default="gauss_w2",
                   help="distances with unit='spatial' on the last feature maps, online (comma list; '' for none)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--num-data", type=int, default=50_000,
                   help="rows of the synthetic teacher table = training-set size (CRD's memory bank)")
    p.add_argument("--steps", type=int, default=3, help="steps per configuration per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--teacher-mode", default="online,cached",
                   help="teacher modes for the term rows: online (forward every step), cached (--teacher-cache lookup)")
    p.add_argument("--out", help="also write the Markdown table here")
    a = p.parse_args(argv)

    modes = [t for t in a.teacher_mode.split(",") if t]
    if not modes or set(modes) - {"online", "cached"}:
        p.error(f"--teacher-mode: a comma list of online, cached; got {a.teacher_mode!r}")
    if a.num_data < a.batch_size:
        p.error(f"--num-data ({a.num_data}) must be at least --batch-size ({a.batch_size}): keys are distinct rows")
    try:
        wanted = term_configs(a.metrics, a.baselines, a.spatial)
    except ValueError as e:
        p.error(str(e))
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    amp_dtype = torch.bfloat16 if a.amp == "bf16" else None
    student = build_model(a.student, a.classes, a.channels, a.image_size).to(device)
    teacher = build_model(a.teacher, a.classes, a.channels, a.image_size).to(device).eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    x = torch.randn(a.batch_size, a.channels, a.image_size, a.image_size, device=device)
    y = torch.arange(a.batch_size, device=device) % a.classes
    keys = torch.randperm(a.num_data, device=device)[: a.batch_size]  # the samples' indices in the table
    if a.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    # the synthetic training set's labels (CRD draws its negatives from other classes)
    train_labels = torch.arange(a.num_data) % a.classes
    bound = {}  # row name -> its bound term, built as the engine builds it
    for name, term in wanted:
        try:  # e.g. a map term on a model without 4-D maps: one line naming the row
            (b,) = bind_terms(Method(name, (term,)), student, teacher, x[:2], a.classes, a.num_data,
                              train_labels=train_labels)
        except ValueError as e:
            p.error(f"{e} (leave the row out: --metrics / --baselines / --spatial)")
        b.module.to(device)
        bound[name] = b
    # one set of taps for every row, as one run's taps serve all its terms
    s_want = wanted_layers(list(bound.values()), "student")
    s_taps = Taps(student, s_want) if s_want else None
    online = OnlineTeacher(teacher, wanted_layers(list(bound.values()), "teacher"))
    cached = None
    if "cached" in modes:  # a table as large as a training set, filled from real teacher outputs
        probe = Taps(teacher, {(PENULTIMATE, False)})
        with torch.no_grad():
            t_logits = teacher(x)
        t_feats = probe.features()[(PENULTIMATE, False)]
        probe.remove()
        reps = -(-a.num_data // a.batch_size)
        cached = CachedTeacher(TeacherCache(t_feats.float().repeat(reps, 1)[: a.num_data],
                                            t_logits.float().repeat(reps, 1)[: a.num_data]), PENULTIMATE)

    net = torch.compile(student) if a.compile else student
    params = list(student.parameters()) + [q for b in bound.values() for q in b.module.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)  # a row's step leaves the others' parameters alone
    steps = {"ce": make_step(net, None, s_taps, [], opt, x, y, keys, amp_dtype),
             "ce+teacher": make_step(net, online, s_taps, [], opt, x, y, keys, amp_dtype)}
    goals = {}
    for name, b in bound.items():
        for mode in modes:
            if mode == "cached" and b.raw:
                continue  # the cache holds pooled features and logits, not maps
            row = name if mode == "online" else f"{name} (cached teacher)"
            steps[row] = make_step(net, online if mode == "online" else cached, s_taps, [b], opt, x, y, keys,
                                   amp_dtype)
            if mode == "cached":
                goals[row] = "report" if name == "crd" else ("≥ 0.8" if name in EXACT_OT else "≥ 0.9")

    for _name, fn in steps.items():  # warm-up (compilation, allocator, solver imports, CRD's Z)
        fn()
    sync(device)
    rates = {name: [] for name in steps}
    peaks = {name: 0 for name in steps}  # CUDA: the most memory allocated during the row's steps
    for _ in range(a.rounds):
        for name, fn in steps.items():
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                fn()
            sync(device)
            rates[name].append(a.steps * a.batch_size / (time.perf_counter() - t0))
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))

    base = statistics.median(rates["ce"])
    with_teacher = statistics.median(rates["ce+teacher"])
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    mem = device.type == "cuda"
    lines = [f"student {a.student}, teacher {a.teacher}, batch {a.batch_size}, {a.image_size}px, {a.classes} classes, "
             f"{dev}, amp {a.amp}, channels_last {a.channels_last}, compile {a.compile}, table {a.num_data} rows; "
             f"median of {a.rounds} rounds × {a.steps} steps", "",
             "| configuration | images/s | × plain student | × CE+teacher forward | goal (× plain) |"
             + (" peak MiB |" if mem else ""),
             "|---|---|---|---|---|" + ("---|" if mem else "")]
    for name in steps:
        r = statistics.median(rates[name])
        lines.append(f"| {name} | {r:.1f} | {r / base:.2f} | {r / with_teacher:.2f} | {goals.get(name, '')} |"
                     + (f" {peaks[name] / 2**20:.0f} |" if mem else ""))
    return emit("\n".join(lines), a.out)


if __name__ == "__main__":
    main()
