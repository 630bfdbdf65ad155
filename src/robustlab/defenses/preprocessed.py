"""Training objectives for the input-preprocessing defences (``--defense feature_squeezing`` etc.).

Each is standard cross-entropy training of a classifier that sits behind its transform
(``Defended``, built by :func:`robustlab.runs.prepare_model` from :meth:`Objective.input_transform`):

- ``feature_squeezing``, ``noise_injection``: the classifier trains on transformed inputs (noise at
  train and test time, as the noise-injection defence prescribes).
- ``autoencoder``: MagNet-style (Meng & Chen 2017): the classifier trains on *clean* images, the
  reformer autoencoder trains on its own denoising loss (added by the training loop through
  :func:`~robustlab.defenses.preprocessing.auxiliary_loss`); at test time images pass the reformer first.

To combine a transform with adversarial training use any objective's ``preprocess`` parameter instead,
e.g. ``defense: {name: pgd_at, preprocess: {name: feature_squeezing, bits: 1}}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from robustlab.defenses.base import LossAndStats, ObjectiveParams, TrainState, batch_accuracy
from robustlab.defenses.preprocessing import (
    AutoencoderParams,
    FeatureSqueezingParams,
    InputTransform,
    NoiseInjectionParams,
    build_transform,
)
from robustlab.defenses.standard import StandardObjective


class _TransformDefenseParams(ObjectiveParams):
    @model_validator(mode="after")
    def _no_second_transform(self) -> _TransformDefenseParams:
        if self.preprocess is not None:
            raise ValueError("this defence is itself an input transform; set its parameters directly, not preprocess")
        return self


class FeatureSqueezingDefenseParams(_TransformDefenseParams, FeatureSqueezingParams):
    pass


class NoiseInjectionDefenseParams(_TransformDefenseParams, NoiseInjectionParams):
    pass


class AutoencoderDefenseParams(_TransformDefenseParams, AutoencoderParams):
    pass


class TransformObjective(StandardObjective):
    """Standard training behind the input transform named like the objective."""

    def input_transform(self, channels: int) -> InputTransform:
        return build_transform(self.params.model_dump(exclude={"preprocess"}), channels)


class FeatureSqueezingObjective(TransformObjective):
    """Feature squeezing (Xu et al. 2018): bit-depth reduction + median filter in front of the classifier."""

    name = "feature_squeezing"
    Params = FeatureSqueezingDefenseParams


class NoiseInjectionObjective(TransformObjective):
    """Gaussian noise injection at training and test time (a random, EOT-requiring defence)."""

    name = "noise_injection"
    Params = NoiseInjectionDefenseParams


class AutoencoderObjective(TransformObjective):
    """MagNet-style reformer: classifier trained on clean images; the autoencoder trains on denoising."""

    name = "autoencoder"
    Params = AutoencoderDefenseParams

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: TrainState) -> LossAndStats:
        logits = model.model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": batch_accuracy(logits, y)}
