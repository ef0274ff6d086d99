"""The GPU benchmark: plain training against every term at the CIFAR-100 resnet32x4 → resnet8x4
shapes, online and with the teacher cache, in bf16 and channels_last; ratios and peak memory.

    python benchmarks/gpu.py                 # on a CUDA machine: about 2-4 minutes on one H100
    python benchmarks/gpu.py --out gpu.md    # also write the Markdown table

It is :mod:`benchmarks.throughput` with the protocol's shapes (32×32 images, 100 classes, batch
64 per GPU as RepDistiller's recipe, a 50 000-row teacher table as CIFAR's training set) and
every term of the registry: the KD²M distances, the baselines, and the spatial Gaussian W2. Each
row is timed the way training runs it (the engine's own step, bf16 autocast, channels_last),
the rows interleaved over rounds, and the peak of allocated GPU memory during each row's steps
is reported beside its speed. Any extra option is passed on to ``throughput.py`` (e.g.
``--steps 5 --rounds 2`` for a quicker look, ``--amp none`` for float32).

Refused with one line, exit code 2, where there is no CUDA device (unless ``--device`` is given:
the tests run it on the CPU at tiny sizes).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

#: the protocol's shapes and the options every row runs with; later command-line options win
PRESET = ["--student", "resnet8x4", "--teacher", "resnet32x4", "--classes", "100", "--image-size", "32",
          "--channels", "3", "--batch-size", "64", "--num-data", "50000", "--amp", "bf16", "--channels-last",
          "--metrics", "w2,cw2,jw2,gauss_w2,gauss_cw2,gauss_kl,gauss_ckl,mmd_rbf,cmmd_rbf,mmd_linear,sliced_w2,"
                       "sinkhorn,gw2",
          "--baselines", "kd,dkd,dist,wkd_l,pkt,rkd,crd,fitnet,at,nst", "--spatial", "gauss_w2,mmd_rbf",
          "--teacher-mode", "online,cached", "--steps", "20", "--rounds", "3", "--device", "cuda"]


def _throughput():
    spec = importlib.util.spec_from_file_location("kd2m_bench_throughput", Path(__file__).with_name("throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--device" not in argv and not torch.cuda.is_available():
        print("gpu.py: error: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or give --device cpu for a smoke test", file=sys.stderr)
        raise SystemExit(2)
    return _throughput().main(PRESET + argv)


if __name__ == "__main__":
    main()
