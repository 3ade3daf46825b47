"""The options of a training run (light module: no onnxruntime-training or torch import)."""

from __future__ import annotations

import dataclasses

from onnxdns.data import DATASET_NAMES as DATASETS  # noqa: F401 - the built-in data sets, named here for training

METHODS = ("dns", "magnitude", "slim", "none")
SCHEDULES = ("constant", "step", "cosine", "inv")
#: BatchNormalization during training: batch statistics with running statistics written back
#: ("train", torch's model.train()) or the stored statistics ("frozen", model.eval()).
BATCHNORM_MODES = ("train", "frozen")
DEFAULT_EPOCHS = 10.0
#: DNS surgery probability (1 + gamma * t) ** -power: the reference README's LeNet-5 example.
DEFAULT_DNS_GAMMA = 1e-4
DEFAULT_DNS_POWER = 1.0
#: Network Slimming: the reference's sparsity rate for VGG (``-sr --s 0.0001``), and ``beta`` of
#: the smooth penalty when ``--smooth-l1`` is given without one.
DEFAULT_SLIM_LAMBDA = 1e-4
DEFAULT_SMOOTH_BETA = 1e-3


@dataclasses.dataclass
class TrainConfig:
    """Everything that determines a run's trajectory (saved in ``run.json``; fixed on resume).

    Runtime options (output path, checkpoint folder, progress bar, threads, data folder) are
    arguments of :func:`onnxdns.training.train` instead and may change on resume.
    """

    #: Training data: ``mnist``, ``fashion-mnist``, a folder of images, ``FILE.npz``/``.npy`` or
    #: ``module:function`` (see :func:`onnxdns.sources.open_source`).
    data: str = "mnist"
    #: Validation data (same kinds); None: ``val_fraction`` of the training data, or for the built-in
    #: data sets their test split.
    val_data: str | None = None
    #: Hold out this fraction of the training data for validation (default 0.1 for user data).
    val_fraction: float | None = None
    #: ``ce`` (labels) or ``distill`` (from the input model); None: ce with labels, distill without.
    loss: str | None = None
    #: Outputs the loss applies to (None: all float outputs for distill, the classifier for ce).
    loss_outputs: list[str] | None = None
    #: Distillation temperature of classifier outputs (None: losses.DEFAULT_TEMPERATURE).
    temperature: float | None = None
    #: Per-channel normalisation of a folder of images (None: mean 0, std 1).
    mean: list[float] | None = None
    std: list[float] | None = None
    method: str = "dns"
    epochs: float | None = None  # default 10 when iterations is not given either
    iterations: int | None = None
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9  # SGD's momentum; AdamW's beta1
    weight_decay: float = 5e-4  # SGD: coupled L2; AdamW: decoupled
    optimizer: str = "sgd"  # or "adamw" (onnxdns.training.optim.OPTIMIZERS)
    schedule: str = "constant"
    lr_gamma: float | None = None
    lr_step: int | None = None
    seed: int = 0
    subset: int | None = None
    test_subset: int | None = None
    prune_biases: bool | None = None  # None: True for dns (as the reference), False otherwise
    dns_c: str | float | dict[str, float] | None = None  # per layer / kind, see dns.parse_layer_values
    dns_gamma: float = DEFAULT_DNS_GAMMA
    dns_power: float = DEFAULT_DNS_POWER
    dns_iter_stop: int | None = None
    dns_ramp: int = 0  # steps over which DNS thresholds rise to their value at a phase start (0: fixed, as published)
    dns_phases: str | None = None
    sparsity: str | float | dict[str, float] | None = None
    quality: float | None = None
    rounds: int = 3
    batchnorm: str | None = None  # None: the method's default ("train" for slim, "frozen" otherwise)
    slim_lambda: float = DEFAULT_SLIM_LAMBDA  # Network Slimming: lambda * sum |gamma| over BatchNorm scales
    smooth_l1: float | None = None  # slim: beta of the smooth penalty sqrt(gamma^2 + beta^2) - beta
