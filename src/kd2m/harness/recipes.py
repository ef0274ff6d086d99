"""Dataset recipes: the defaults a run takes where its config leaves a field unset.

:data:`DATASET_DEFAULTS` holds the tuned recipes (digits, MNIST-1D), :data:`IMAGE_DEFAULTS` every
other image dataset's and :data:`LM_DEFAULTS` text's; :func:`defaults_for` picks a dataset's, and
:func:`fill_defaults` writes them into a config (the first phase of
:meth:`kd2m.harness.config.RunConfig.resolved`).
"""
from __future__ import annotations

from pathlib import Path

from .. import losses
from ..catalog import CE
from ..data import dataset_task
from ..errors import ConfigError

__all__ = ["DATASET_DEFAULTS", "IMAGE_DEFAULTS", "LM_DEFAULTS", "SELECT_SEEDS", "defaults_for", "fill_defaults",
           "without_distance_weights"]

#: Per-dataset defaults, used where the user left a field unset (None). configs/digits.yaml and
#: configs/mnist1d.yaml write these out; tests/integration/test_engine.py checks that they agree.
DATASET_DEFAULTS = {
    # Tiny models: one CPU thread is as fast as two when idle and 10-100x faster when the cores
    # are shared (OpenMP barriers spin against the other load).
    # The student trains 10 epochs against a 30-epoch teacher: a budget-limited student, the
    # regime where a teacher has something to add. λ per term (distances differ by orders of
    # magnitude in scale; DKD's authors' λ = 1 diverges on this MLP) was picked by
    # `kd2m bench --sweep weight=...` (and per-baseline sweeps) on seeds 100-102, which are never
    # reported; gauss_kl gets ridge 0.1 because the teacher has dead ReLU channels that make
    # KL(N_S‖N_T) ~1e5 with the library's 1e-5 ridge. Seeds 0-9 are the reported ones.
    # No augmentation on the digits: the teacher cache with one view is exact and saves the
    # teacher's forward pass every step (about 40% of a distilled student's time).
    "digits": dict(teacher="digits_cnn", student="digits_mlp", epochs=10, teacher_epochs=30, lr=0.05,
                   weight=0.01, num_workers=0, threads=1, seeds=10, teacher_cache=1, parallel=2,
                   weights={"w2": 0.01, "cw2": 0.1, "jw2": 0.001, "gauss_w2": 0.01, "gauss_cw2": 0.1,
                            "gauss_kl": 0.03, "gauss_ckl": 0.03, "mmd_rbf": 10.0, "cmmd_rbf": 10.0,
                            "kd": 1.0, "dkd": 0.1, "dist": 1.0},
                   # KD's λ = 1 was swept with CE at weight 1 (the authors' CIFAR loss is 0.1·CE + 0.9·KD)
                   ce_weights={"kd": 1.0},
                   # (DKD's warm-up, 20 of mdistiller's 240 epochs, is scaled to the run: 1 of 10)
                   term_options={"gauss_kl": {"ridge": 0.1}, "gauss_ckl": {"ridge": 0.1}}),
    # MNIST-1D (Greydanus & Kobak): the paper's 1-D CNN teacher and MLP student, 4000 training
    # signals, no augmentation (so the teacher cache with one view is exact and saves the
    # teacher's forward pass every step). No λ was tuned here: every term uses `weight: auto`, its K
    # chosen on a holdout (kd2m.harness.select_k; the baselines' CIFAR λ do not transfer: DKD's λ = 1 diverged).
    "mnist1d": dict(teacher="mnist1d_cnn", student="mnist1d_mlp", epochs=60, teacher_epochs=60, lr=0.05,
                    batch_size=100, weight="auto", num_workers=0, threads=1, seeds=10, teacher_cache=1, parallel=2,
                    weights={"kd": "auto", "dkd": "auto", "dist": "auto", "pkt": "auto"}, ce_weights={"kd": 1.0}),
}
#: seeds of a ``select_k`` pilot grid unless given: the repository's tuning seeds, never reported
SELECT_SEEDS = (100, 101, 102)
IMAGE_DEFAULTS = dict(teacher="cifar_resnet34", student="cifar_resnet18", epochs=15, lr=1e-2, weight=1e-4,
                      num_workers=2, threads=0, seeds=3, batch_size=128, teacher_cache=0)
#: Text (``python_docs``, ``text:PATH``): byte-level GPT-2s trained from scratch here with AdamW
#: (weight decay: the run's, 5e-4 by default), a
#: 2-layer teacher (width 128, lr 1e-3, 2 epochs) and a 1-layer student (width 64, lr 3e-3, 2
#: epochs), the teacher read from the exact one-view cache; the LLM field's divergences at λ 1 and
#: every paper distance at `weight: auto` (its K chosen on a holdout: kd2m.harness.select_k) on the final
#: hidden states, a token of the batch being one sample (unit tokens) and its next token its label.
#: The recipe was chosen on tuning seed 100 (teacher lr 3e-3 left no gap to the student: perplexity
#: 8.45 against 8.78; 1e-3 gave 6.58), and the teacher's epochs (2, not 3) so that the grid fits 15
#: minutes on 2 cores at 6 seeds without the choice of K (README "Language models").
LM_DEFAULTS = dict(teacher="hf:gpt2", student="hf:gpt2",
                   teacher_options={"n_layer": 2, "n_embd": 128, "n_head": 4},
                   student_options={"n_layer": 1, "n_embd": 64, "n_head": 2},
                   epochs=2, teacher_epochs=2, lr=3e-3, teacher_lr=1e-3, optimizer="adamw",
                   batch_size=32, image_size=64, weight="auto", unit="tokens", num_workers=0, threads=1, seeds=6,
                   parallel=2, teacher_cache=1, baselines=["ce", "fkl", "rkl", "jsd"])


def defaults_for(dataset: str) -> dict:
    """The defaults of ``dataset``: its entry of :data:`DATASET_DEFAULTS`, :data:`LM_DEFAULTS` for
    text, else :data:`IMAGE_DEFAULTS`."""
    if dataset in DATASET_DEFAULTS:
        return DATASET_DEFAULTS[dataset]
    return LM_DEFAULTS if dataset_task(dataset) == "lm" else IMAGE_DEFAULTS


def without_distance_weights(weights: dict) -> dict:
    """The entries of ``weights`` (λ per term name) that a given ``weight`` leaves: the baselines'.

    ``weight`` is every KD²M distance's λ, so where it is given it drops the distances' λ per term
    written below it (a dataset's defaults, a config file's ``weights`` under ``--weight``) and
    keeps the baselines' (DKD's λ, KD's CE weight): ``weight`` only ever sets the distances'.
    """
    distances = losses.available("kd2m")
    return {k: w for k, w in weights.items() if k not in distances}


def fill_defaults(c) -> None:
    """The dataset's defaults where the user left a field of ``c`` (a RunConfig) unset (None)."""
    defaults = {"batch_size": 128, "teacher_cache": 0, "seeds": 3, "parallel": 1, "optimizer": "sgd",
                "unit": "batch", "baselines": [CE, "kd", "dkd", "dist"], **defaults_for(c.dataset)}
    defaults["task"] = dataset_task(c.dataset)
    # Per-term λ defaults apply only while the user set no `weights:`, and a given weight drops the
    # distances' among them (without_distance_weights)
    default_weights = defaults.pop("weights", {})
    default_ce = defaults.pop("ce_weights", {})  # swept together with the λ of `weights`: they go together
    if c.ce_weights is None:
        c.ce_weights = dict(default_ce) if c.weights is None else {}
    if c.weights is None:
        c.weights = dict(default_weights) if c.weight is None else without_distance_weights(default_weights)
    default_options = defaults.pop("term_options", {})
    given_models = {k for k in ("teacher", "student", "teacher_options", "student_options")
                    if getattr(c, k) is not None}
    if c.baselines is None:
        c.baselines = list(defaults["baselines"])
    if c.term_options is None:
        c.term_options = {m: dict(o) for m, o in default_options.items() if m in c.metrics or m in c.baselines}
    for key, value in defaults.items():
        if getattr(c, key) is None:
            setattr(c, key, value)
    _fill_hf_models(c, given_models)
    if c.teacher_epochs is None:
        c.teacher_epochs = c.epochs
    if c.out is None:
        c.out = str(Path("runs") / c.dataset)
    if c.weight is None:
        c.weight = 1.0


#: the text defaults' GPT-2 options by the names every transformers config answers to
_HF_COMMON_NAMES = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads"}


def _fill_hf_models(c, given: set) -> None:
    """What each ``hf:`` network really is. A ``save_pretrained`` directory given as
    ``pretrained_<role>`` decides its architecture: the role is named after its ``model_type`` and
    its options are its config (what config.json, the card and every run's settings then record);
    options or another model type given with it are refused, as they would be ignored. Else the
    text defaults' GPT-2 options go to another model type under the names its config takes
    (``hidden_size`` …), only those it has. A GGUF file is a directory's like (its metadata is
    its config), and its tokenizer is the data's unless ``tokenizer`` is given."""
    from ..models.hf import hf_directory_config, hf_gguf_config, is_gguf, is_hf
    for role in ("teacher", "student"):
        name, weights, key = getattr(c, role), getattr(c, f"pretrained_{role}"), f"{role}_options"
        if not is_hf(name):
            continue
        source = "its metadata" if is_gguf(weights) else "its config.json"
        if is_gguf(weights):
            try:  # a missing, corrupt or unloadable file is refused now, before any data is read
                directory = hf_gguf_config(weights)
            except (ValueError, OSError) as e:
                raise ConfigError(f"pretrained_{role}: {e}") from None
            if c.tokenizer is None:
                c.tokenizer = weights  # its own vocabulary: the tokenizer its model was trained with
        else:
            directory = hf_directory_config(weights) if weights and Path(weights).is_dir() else None
        if directory is not None:
            built = f"hf:{directory['model_type']}"
            if role in given and name != built:
                raise ConfigError(f"{role}: {name}, but pretrained_{role} {weights} holds a {built} model ({source}); "
                                  f"give {role}: {built}, or leave {role} out")
            if key in given and getattr(c, key) and getattr(c, key) != directory:
                raise ConfigError(f"{key}: pretrained_{role} {weights} holds its own architecture ({source}), "
                                  f"so these options would be ignored; leave {key} out")
            setattr(c, role, built)
            setattr(c, key, directory)
        elif key not in given and name != LM_DEFAULTS[role] and getattr(c, key):
            setattr(c, key, _hf_defaults_for(name, getattr(c, key)))


def _hf_defaults_for(name: str, options: dict) -> dict:
    """The default GPT-2 ``options`` for model ``name`` (``hf:MODEL_TYPE``): those its config has,
    under their common names; {} where transformers or the type is unknown (the build says why)."""
    try:
        from transformers import AutoConfig
        config = AutoConfig.for_model(name[len("hf:"):])
    except (ImportError, ValueError):
        return {}
    renamed = {_HF_COMMON_NAMES.get(k, k): v for k, v in options.items()}
    return {k: v for k, v in renamed.items() if hasattr(config, k)}
