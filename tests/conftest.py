"""Tests run single-threaded: the models and batches are tiny, and on a shared 2-core machine
OpenMP's spinning threads make them 10-100x slower than one thread."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses the tests start
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
