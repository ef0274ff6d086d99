"""Distances between the student's and the teacher's feature distributions on a batch.

Two doors: ``get(name, **options)`` returns a bound callable, and every metric is also a
plain documented function in its module. ``available()`` lists the names.

    >>> from kd2m import metrics
    >>> d = metrics.get("cw2")
    >>> loss = d(student_feats, teacher_feats, labels)          # doctest: +SKIP

Modules, one family each: ``exact`` (exact optimal transport: w2, cw2, jw2),
``gromov`` (gw2), ``entropic`` (sinkhorn; its solver is ``sinkhorn_solver``), ``sliced`` (sliced_w2),
``gaussian`` (gauss_w2, gauss_cw2, gauss_kl, gauss_ckl), ``mmd`` (mmd_linear, mmd_rbf, cmmd_rbf).
"""
from . import entropic, exact, gaussian, gromov, mmd, sliced  # noqa: F401  (registers the metrics)
from ._base import Metric, available, check_inputs, get, spec  # noqa: F401

__all__ = ["get", "available", "Metric", "check_inputs", "spec",
           "exact", "gromov", "entropic", "sliced", "gaussian", "mmd"]
