"""kd2m inside other libraries' training loops, each an optional extra.

- :mod:`kd2m.integrations.hf`: ``KD2MTrainer`` / ``KD2MTrainingArguments`` for
  ``transformers.Trainer`` (``pip install "kd2m[hf]"``);
- :mod:`kd2m.integrations.trl`: a kd2m hidden-state term added to TRL's GKD loss
  (``pip install "kd2m[trl]"``);
- :mod:`kd2m.integrations.lightning`: ``KD2MMixin`` for a LightningModule (``pip install "kd2m[lightning]"``).

Each module imports its library on import and says in one line which extra is missing.
"""
from __future__ import annotations

__all__: list[str] = []
