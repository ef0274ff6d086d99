"""Published accuracies: the KD²M paper's one-seed table (:data:`KD2M_PAPER`), and CIFAR-100 top-1
accuracies (%) for the usual RepDistiller teacher → student pairs (:data:`CIFAR100`).

``CIFAR100[(teacher, student)][method]`` is a :class:`Published` number with its source, for
``method`` in :data:`METHODS`: ``teacher`` and ``student`` (each trained alone with CE), ``kd``,
``dkd``, ``crd``, ``dist``, ``wkd_l``, ``wkd_f``, ``wkd_l+wkd_f``, ``ls_kd`` and ``ls_dkd`` (the
student names of configs/crd/). Model names are kd2m's registry names (configs/crd/ has one config
per pair). Only numbers read in the sources below are here; :func:`missing` lists the rest:

- RepDistiller README ("Benchmark Results on CIFAR-100", tables 1 and 2): teacher, student, KD
  and CRD (Tian et al., *Contrastive Representation Distillation*, ICLR 2020; mean of their runs).
- mdistiller README ("Decoupled Knowledge Distillation — Main Benchmark Results", CIFAR-100):
  DKD (Zhao et al., CVPR 2022). Its KD row repeats RepDistiller's KD values.
- hunto/DIST_KD README (CIFAR-100 table): DIST (Huang et al., *Knowledge Distillation from A
  Stronger Teacher*, NeurIPS 2022), mean ± std.
- JiamingLv/WKD README (commit 214cf88, "Image Classification On CIFAR-100", L92-143): WKD-L,
  WKD-F and WKD-L+WKD-F (Lv, Yang & Li, *Wasserstein Distance Rivals Kullback-Leibler Divergence
  for Knowledge Distillation*, NeurIPS 2024) for the two pairs it publishes, resnet32x4 → resnet8x4
  and wrn_40_2 → ShuffleV1.
- sunshangquan/logit-standardization-KD README (commit f6e5aa5, CIFAR-100 tables 1 and 2, rows
  "KD+Ours" and "DKD+Ours", L90, L94, L103, L107): KD and DKD with logit standardization (Sun et
  al., *Logit Standardization in Knowledge Distillation*, CVPR 2024).

    >>> from kd2m.harness.published import CIFAR100
    >>> CIFAR100[("resnet32x4", "resnet8x4")]["crd"].accuracy
    75.51
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KD2M_PAPER", "METHODS", "REPDISTILLER_SAME", "REPDISTILLER_DIFF", "MDISTILLER", "MDISTILLER_SHUFFLEV2",
           "DIST", "WKD", "LS_SAME", "LS_DIFF", "Published", "CIFAR100", "missing"]

#: The KD²M paper's reported accuracies (%), one seed (Montesuma, GSI 2025, its Table; restated in shared/PAPER.md):
#: torchvision ResNet-34 → ResNet-18, ImageNet-pretrained, 15 epochs. Keys are kd2m's method keys.
KD2M_PAPER = {
    "svhn": {"ce": 93.10, "teacher": 94.41, "w2": 94.00, "cw2": 94.06, "jw2": 94.00, "gauss_w2": 93.94,
             "gauss_cw2": 93.95, "gauss_kl": 94.05},
    "cifar10": {"ce": 85.11, "teacher": 86.98, "w2": 86.45, "cw2": 86.54, "jw2": 86.60, "gauss_w2": 86.63,
                "gauss_cw2": 86.25, "gauss_kl": 86.44},
    "cifar100": {"ce": 56.66, "teacher": 62.21, "w2": 61.07, "cw2": 61.47, "jw2": 61.07, "gauss_w2": 60.68,
                 "gauss_cw2": 61.43, "gauss_kl": 60.66},
}

METHODS = ("teacher", "student", "kd", "dkd", "crd", "dist", "wkd_l", "wkd_f", "wkd_l+wkd_f", "ls_kd", "ls_dkd")

REPDISTILLER_SAME = "Tian et al., CRD (ICLR 2020): RepDistiller README, CIFAR-100 table 1 (same architecture type)"
REPDISTILLER_DIFF = "Tian et al., CRD (ICLR 2020): RepDistiller README, CIFAR-100 table 2 (different architecture type)"
MDISTILLER = "Zhao et al., DKD (CVPR 2022): mdistiller README, 'Main Benchmark Results' on CIFAR-100"
MDISTILLER_SHUFFLEV2 = (MDISTILLER + "; the README labels this column 'ResNet32x4 / MobileNet-V2', but its KD "
                        "value 74.45 is RepDistiller's resnet32x4 -> ShuffleNetV2 KD and the same README's DOT "
                        "table names that pair ResNet32x4 / ShuffleNet-V2")
DIST = "Huang et al., DIST (NeurIPS 2022): hunto/DIST_KD README, CIFAR-100 table"
WKD = "Lv, Yang & Li, WKD (NeurIPS 2024): JiamingLv/WKD README, 'Image Classification On CIFAR-100'"
LS_SAME = ("Sun et al., logit standardization (CVPR 2024): sunshangquan/logit-standardization-KD README, "
           "CIFAR-100 table 1 (identical structures), rows KD+Ours / DKD+Ours")
LS_DIFF = ("Sun et al., logit standardization (CVPR 2024): sunshangquan/logit-standardization-KD README, "
           "CIFAR-100 table 2 (distinct structures), rows KD+Ours / DKD+Ours")


@dataclass(frozen=True)
class Published:
    """One published top-1 accuracy (%) on the CIFAR-100 test set, with its source."""

    accuracy: float
    source: str
    std: float | None = None  # where the source gives mean ± std


def _wkd(wkd_l: float, wkd_f: float, both: float) -> dict[str, Published]:
    return {"wkd_l": Published(wkd_l, WKD), "wkd_f": Published(wkd_f, WKD), "wkd_l+wkd_f": Published(both, WKD)}


def _ls(ls_kd: float, ls_dkd: float, source: str) -> dict[str, Published]:
    return {"ls_kd": Published(ls_kd, source), "ls_dkd": Published(ls_dkd, source)}


def _repdistiller(teacher: float, student: float, kd: float, crd: float, source: str) -> dict[str, Published]:
    return {"teacher": Published(teacher, source), "student": Published(student, source),
            "kd": Published(kd, source), "crd": Published(crd, source)}


CIFAR100: dict[tuple[str, str], dict[str, Published]] = {
    ("resnet32x4", "resnet8x4"): {**_repdistiller(79.42, 72.50, 73.33, 75.51, REPDISTILLER_SAME),
                                  "dkd": Published(76.32, MDISTILLER), "dist": Published(76.31, DIST, 0.19),
                                  **_wkd(76.53, 76.77, 77.28), **_ls(76.62, 77.01, LS_SAME)},
    ("resnet56", "resnet20"): {**_repdistiller(72.34, 69.06, 70.66, 71.16, REPDISTILLER_SAME),
                               "dkd": Published(71.97, MDISTILLER), "dist": Published(71.75, DIST, 0.30),
                               **_ls(71.43, 72.32, LS_SAME)},
    ("resnet110", "resnet32"): {**_repdistiller(74.31, 71.14, 73.08, 73.48, REPDISTILLER_SAME),
                                "dkd": Published(74.11, MDISTILLER), **_ls(74.17, 74.29, LS_SAME)},
    ("wrn_40_2", "wrn_16_2"): {**_repdistiller(75.61, 73.26, 74.92, 75.48, REPDISTILLER_SAME),
                               "dkd": Published(76.23, MDISTILLER), **_ls(76.11, 76.39, LS_SAME)},
    ("wrn_40_2", "wrn_40_1"): {**_repdistiller(75.61, 71.98, 73.54, 74.14, REPDISTILLER_SAME),
                               "dkd": Published(74.81, MDISTILLER), "dist": Published(74.43, DIST, 0.24),
                               **_ls(74.37, 74.89, LS_SAME)},
    ("vgg13", "vgg8"): {**_repdistiller(74.64, 70.36, 72.98, 73.94, REPDISTILLER_SAME),
                        "dkd": Published(74.68, MDISTILLER), **_ls(74.36, 74.81, LS_SAME)},
    ("resnet32x4", "ShuffleV2"): {**_repdistiller(79.42, 71.82, 74.45, 75.65, REPDISTILLER_DIFF),
                                  "dkd": Published(77.07, MDISTILLER_SHUFFLEV2), "dist": Published(77.35, DIST, 0.25),
                                  **_ls(75.56, 77.37, LS_DIFF)},
    ("resnet32x4", "ShuffleV1"): {**_repdistiller(79.42, 70.50, 74.07, 75.11, REPDISTILLER_DIFF),
                                  "dkd": Published(76.45, MDISTILLER), "dist": Published(76.34, DIST, 0.18)},
    ("vgg13", "MobileNetV2"): {**_repdistiller(74.64, 64.60, 67.37, 69.73, REPDISTILLER_DIFF),
                               "dkd": Published(69.71, MDISTILLER), **_ls(68.61, 69.98, LS_DIFF)},
    ("wrn_40_2", "ShuffleV1"): {**_repdistiller(75.61, 70.50, 74.83, 76.05, REPDISTILLER_DIFF),
                                "dkd": Published(76.70, MDISTILLER), **_wkd(76.72, 77.36, 77.50)},
}


def missing() -> dict[tuple[str, str], list[str]]:
    """For each pair, the methods of :data:`METHODS` with no recorded number."""
    return {pair: [m for m in METHODS if m not in numbers] for pair, numbers in CIFAR100.items()}
