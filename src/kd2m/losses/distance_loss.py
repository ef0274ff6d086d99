"""The module users drop into their own training loop.

    loss = ce(student_logits, y) + kd2m_loss(student_feats, teacher_feats, y, student_logits, teacher_logits)

``KD2MLoss`` = λ · D(student feature distribution, teacher feature distribution), D any
metric of :mod:`kd2m.metrics`. The teacher's inputs are detached (it is frozen).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import metrics
from ..catalog import UNITS
from ..metrics import batched
from ..projectors import build_projector

__all__ = ["MAX_TOKENS", "TOKEN_SEED", "KD2MLoss", "spatial_sets", "hinton_kd"]

#: unit="tokens": positions kept per step (exact OT is O(n³) in them), and the seed that picks them
MAX_TOKENS = 256
TOKEN_SEED = 0


class KD2MLoss(nn.Module):
    """λ · D(g_S♯P̂, g_T♯P̂) on a batch, where the unit of "sample" is chosen by ``unit``.

    Units:

    - ``"batch"`` (default, the paper): one sample per image, pooled features ``(n, d)``; D
      between the batch's student and teacher distributions.
    - ``"spatial"``: per image, its h·w position vectors of a map ``(n, c, h, w)`` (or its L
      tokens ``(n, L, d)``) form the distribution; D is computed per image and averaged over
      the n images (:func:`kd2m.metrics.batched.spatial_distance`: batched for ``gauss_w2``,
      ``gauss_kl``, ``mmd_rbf``, ``mmd_linear``, ``sliced_w2``; exact OT ``w2``, ``gw2`` and
      ``sinkhorn`` loop over the images). Class-conditional metrics are refused (every position
      of an image shares its label). With ``gauss_w2, diagonal=True`` this is WKD-F's feature
      loss (Lv et al., NeurIPS 2024); its conventions are the options ``mean_weight=`` (their
      mean/cov ratio), ``correction=1`` (unbiased variance) and ``abs_ridge=`` (their eps).
      Global-batch matching does not apply (images are independent: local = global).
    - ``"sequence"``: ``"spatial"`` by its name for token models: each sequence's L tokens
      ``(n, L, d)`` form a distribution, D averaged over the n sequences.
    - ``"tokens"``: every position of every sample of the batch is one sample of one distribution
      (a language model's tokens ``(n, L, d)``, or the positions of maps ``(n, c, h, w)``), the
      batch's ``n·L`` positions subsampled to at most ``max_tokens`` (default :data:`MAX_TOKENS`) by a fixed
      seeded choice (``token_seed``; the same positions every step, so training stays
      deterministic and exact OT stays cheap); labels ``(n·L,)`` (a language model's next tokens)
      or ``(n,)`` (each position takes its sample's label) make the label-aware distances
      condition on them. Global-batch matching gathers the subsampled positions.
    - ``"class"``: one distribution per class, i.e. what the class-conditional metrics
      (``cw2``, ``gauss_cw2``, ``gauss_ckl``, ``cmmd_rbf``) already do on pooled features; the
      unit only checks that the metric is one of them.

    Args:
        metric: a name from ``kd2m.metrics.available()`` (default ``"cw2"``, the paper's best family:
            label-aware).
        weight: λ.
        unit: ``"batch"``, ``"spatial"`` or ``"class"`` (above).
        student_shape, teacher_shape: per-sample shapes at the tapped layers, ``(d,)``,
            ``(c, h, w)`` or ``(L, d)``. When they differ in width (or, maps with
            ``unit="spatial"``, in grid) a learnable projector is applied to the student side
            (:func:`kd2m.projectors.build_projector`; put ``loss.parameters()`` in your
            optimizer). Not built for ``gw2``.
        student_dim, teacher_dim: shorthand for ``student_shape=(student_dim,)`` etc.
        match: ``"global"`` (default) gathers features from all ranks under torch.distributed so
            the metric sees the global batch; ``"local"`` uses each rank's batch. A no-op when not
            distributed, and for ``unit="spatial"``.
        **metric_options: passed to ``metrics.get`` (e.g. ``eps=0.1`` for sinkhorn).

    Shapes: feats ``(n, d)`` (``unit="spatial"``: ``(n, c, h, w)`` or ``(n, L, d)``), labels
    ``(n,)`` int, logits ``(n, C)``; returns a 0-dim tensor.
    """

    def __init__(self, metric: str = "cw2", weight: float = 1.0, *, unit: str = "batch",
                 student_dim: int | None = None, teacher_dim: int | None = None,
                 student_shape: tuple[int, ...] | None = None, teacher_shape: tuple[int, ...] | None = None,
                 match: str = "global", max_tokens: int = MAX_TOKENS, token_seed: int = TOKEN_SEED, **metric_options):
        super().__init__()
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        unit = "spatial" if unit == "sequence" else unit
        self.unit = unit
        for name, value, low in (("max_tokens", max_tokens, 1), ("token_seed", token_seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
        self.max_tokens, self.token_seed = max_tokens, token_seed
        self._token_index: dict = {}  # (positions, device) -> the fixed subsample of unit="tokens"
        own = dict(metric_options)
        set_options = {}
        if unit == "spatial":
            batched.check_set_metric(metric, metric_options)
            set_options = {k: own.pop(k) for k in list(own) if k in batched.GAUSS_W2_SET_OPTIONS}
        elif metric == "gauss_w2" and set(own) & set(batched.GAUSS_W2_SET_OPTIONS):
            raise ValueError(f"gauss_w2: {', '.join(sorted(set(own) & set(batched.GAUSS_W2_SET_OPTIONS)))} "
                             "are options of unit='spatial' (WKD-F's conventions)")
        self.metric = metrics.get(metric, **own)
        self.set_options = set_options
        if unit == "class" and not self.metric.needs_labels:
            classwise = [m for m in metrics.available() if metrics.spec(m).needs_labels]
            raise ValueError(f"unit='class' needs a class-conditional metric ({', '.join(classwise)}); "
                             f"{metric!r} is not one")
        self.weight = float(weight)
        if match not in ("global", "local"):
            raise ValueError(f"match must be 'global' or 'local', got {match!r}")
        self.match = match
        if student_shape is None and student_dim:
            student_shape = (int(student_dim),)
        if teacher_shape is None and teacher_dim:
            teacher_shape = (int(teacher_dim),)
        self.projector = build_projector(student_shape, teacher_shape, unit) if self.metric.same_dim else None

    def forward(self, student_feats: Tensor, teacher_feats: Tensor, labels: Tensor | None = None,
                student_logits: Tensor | None = None, teacher_logits: Tensor | None = None) -> Tensor:
        return self.weight * self.distance(student_feats, teacher_feats, labels, student_logits, teacher_logits)

    def distance(self, student_feats, teacher_feats, labels=None, student_logits=None, teacher_logits=None) -> Tensor:
        """D itself, unweighted (what the engine logs)."""
        teacher_feats = teacher_feats.detach()
        if self.unit == "spatial":
            return self._spatial(student_feats, teacher_feats)
        teacher_logits = teacher_logits.detach() if teacher_logits is not None else None
        if self.projector is not None:
            student_feats = self.projector(student_feats)
        if self.unit == "tokens":
            student_feats, teacher_feats, labels = self._tokens(student_feats, teacher_feats, labels)
            student_logits = teacher_logits = None  # per sample, not per position
        if self.match == "global":
            from ..distributed import gather_batch
            student_feats, teacher_feats, labels, student_logits, teacher_logits = gather_batch(
                student_feats, teacher_feats, labels, student_logits, teacher_logits)
        # Distances are computed in at least float32 even under autocast: OT plans and matrix
        # square roots are not meaningful in bf16/fp16.
        with torch.autocast(device_type=student_feats.device.type, enabled=False):
            return self.metric(_f32(student_feats), _f32(teacher_feats), labels,
                               _f32(student_logits), _f32(teacher_logits))

    def _tokens(self, s: Tensor, t: Tensor, labels) -> tuple[Tensor, Tensor, Tensor | None]:
        """unit="tokens": (positions, d) student and teacher features and their labels, every
        position of the batch pooled into one set and subsampled (see the class docstring)."""
        name = self.metric.name
        _check_positions(name, "tokens", s, t)
        s, t = spatial_sets(s, t)
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(f"{name}: unit='tokens' pairs positions: student has {tuple(s.shape[:2])} (samples, "
                             f"positions), teacher {tuple(t.shape[:2])}")
        n, m = s.shape[0], s.shape[1]
        s, t = s.reshape(n * m, s.shape[2]), t.reshape(n * m, t.shape[2])
        if labels is not None:
            if labels.numel() == n * m:
                labels = labels.reshape(-1)
            elif labels.shape == (n,):
                labels = labels.repeat_interleave(m)
            else:
                raise ValueError(f"{name}: unit='tokens' takes labels per position ({n * m},) or per sample ({n},), "
                                 f"got {tuple(labels.shape)}")
        if n * m > self.max_tokens:
            key = (n * m, s.device)
            if key not in self._token_index:
                g = torch.Generator().manual_seed(self.token_seed)
                chosen = torch.randperm(n * m, generator=g)[:self.max_tokens].sort().values
                self._token_index[key] = chosen.to(s.device)
            idx = self._token_index[key]
            s, t = s[idx], t[idx]
            labels = labels[idx] if labels is not None else None
        return s, t, labels

    def _spatial(self, s: Tensor, t: Tensor) -> Tensor:
        name = self.metric.name
        _check_positions(name, "spatial", s, t)
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"{name}: unit='spatial' pairs images: student has n={s.shape[0]}, "
                             f"teacher n={t.shape[0]}")
        if self.projector is not None:
            s = self.projector(s)
        s, t = spatial_sets(s, t)
        metrics.check_inputs(name, s.flatten(0, 1), t.flatten(0, 1), None, None, None,
                             same_dim=self.metric.same_dim)
        with torch.autocast(device_type=s.device.type, enabled=False):
            values = batched.spatial_distance(name, _f32(s), _f32(t), **self.metric.options, **self.set_options)
        return values.mean()

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.set_options.items())
        tokens = f", max_tokens={self.max_tokens}" if self.unit == "tokens" else ""
        return f"metric={self.metric!r}, weight={self.weight:g}, unit={self.unit!r}, match={self.match!r}{opts}{tokens}"


def _check_positions(name: str, unit: str, s, t) -> None:
    """ValueError unless both are per-position features: maps (n, c, h, w) or tokens (n, L, d)."""
    for who, x in (("student_feats", s), ("teacher_feats", t)):
        if not isinstance(x, Tensor) or x.dim() not in (3, 4):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: unit={unit!r} needs {who} as maps (n, c, h, w) or tokens (n, L, d), "
                             f"got {shape}; tap the layer with FeatureTap(..., pool='none')")


def spatial_sets(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image sets of position vectors: maps (n, c, h, w) → (n, h·w, c); tokens (n, L, d) as they are.

    When one side is tokens and the other a map with L = h·w + 1, the first token (a ViT's class
    token, a summary rather than a position) is dropped so both sets hold the same positions.
    """
    def positions(x):  # contiguous: elementwise ops on the strided transpose run ~10× slower
        return x.flatten(2).transpose(1, 2).contiguous() if x.dim() == 4 else x

    if student.dim() != teacher.dim():
        tokens, grid = (student, teacher) if student.dim() == 3 else (teacher, student)
        if tokens.shape[1] == grid.shape[2] * grid.shape[3] + 1:
            tokens = tokens[:, 1:]
        student, teacher = (tokens, grid) if student.dim() == 3 else (grid, tokens)
    return positions(student), positions(teacher)


def _f32(x):
    if x is None or x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def hinton_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al. (2015) logit distillation: T² · KL(softmax(z_T/T) ‖ softmax(z_S/T)), batch mean,
    computed in float32: the ``"kd"`` term of :mod:`kd2m.losses` (:func:`kd2m.losses.logit.kd`).

    KL(teacher ‖ student) — the direction of the original paper (the reference code of KD²M used
    the reverse).
    """
    from .logit import kd  # here, not at the top: kd2m.losses imports this module
    return kd(student_logits=student_logits.float(), teacher_logits=teacher_logits.detach().float(),
              temperature=temperature)
