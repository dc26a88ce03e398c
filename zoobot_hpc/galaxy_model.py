"""The LightningModule: encoder + Dirichlet head, trained on the Dirichlet-Multinomial vote likelihood.

Its hyperparameters carry everything needed to use a checkpoint alone: the schema, architecture,
channels, transform settings and the package version, so `GalaxyZooModel.load_from_checkpoint(path)`
needs no other argument.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from zoobot_hpc.augment import GalaxyAugment
from zoobot_hpc.bad_images import check_policy
from zoobot_hpc.checkpoint import UNRECORDED_GREY
from zoobot_hpc.errors import InputError, RunError
from zoobot_hpc.loss import DirichletMultinomialLoss
from zoobot_hpc.models import DirichletHead, build_encoder
from zoobot_hpc.schema import Schema

log = logging.getLogger(__name__)


class NonFiniteLossError(RunError):
    """The loss became NaN or infinite; raised before the weights are updated with it."""


class GalaxyZooModel(pl.LightningModule):
    def __init__(
        self,
        schema: dict[str, Any],
        model_architecture: str = "efficientnet",
        channels: int = 1,
        resize_size: int = 224,
        crop_scale_bounds: Sequence[float] = (0.7, 0.8),
        crop_ratio_bounds: Sequence[float] = (0.9, 1.1),
        dropout_rate: float = 0.2,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.05,
        channels_last: bool = False,
        on_nonfinite_loss: str = "error",
        package_version: str = "",
        grey: str = UNRECORDED_GREY,  # train() always passes its own
    ) -> None:
        super().__init__()
        check_policy("on_nonfinite_loss", on_nonfinite_loss)
        self.save_hyperparameters()
        self.skipped_steps = 0
        self._skip_update = False
        self.schema = Schema.from_dict(schema)
        self.encoder, n_features = build_encoder(model_architecture, channels)
        self.head = DirichletHead(n_features, len(self.schema.label_cols), dropout_rate)
        self.augment = GalaxyAugment(resize_size, crop_scale_bounds, crop_ratio_bounds)
        self.vote_loss = DirichletMultinomialLoss(self.schema.answer_to_question_matrix)
        self.use_channels_last(channels_last)

    def use_channels_last(self, channels_last: bool) -> None:
        """Run the encoder channels-last or contiguous (the same weights, laid out differently):
        training records its choice, prediction picks the one that suits its own device."""
        self.hparams.channels_last = channels_last
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.encoder = self.encoder.to(memory_format=layout)

    # ------------------------------------------------------------------ forward
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.encoder(images)

    def forward(self, images: torch.Tensor, dropout: bool | None = None) -> torch.Tensor:
        """Concentrations (B, answers) of preprocessed images; dropout follows `training` by default."""
        return self.head(self.encode(images), self.training if dropout is None else dropout)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Augment (training) or apply the eval transform, on the device the batch now lives on."""
        images = batch["image"]
        if images.shape[1] != self.hparams.channels:
            raise InputError(
                f"the images have {images.shape[1]} channel(s) but the model takes "
                f"{self.hparams.channels} (color={self.hparams.channels == 3} at training time)"
            )
        training = self._trainer is not None and self.trainer.training
        batch["image"] = self.augment(images, train=training)
        return batch

    # ------------------------------------------------------------------ steps
    def _losses(self, batch: dict[str, Any], reduction: str = "none") -> torch.Tensor:
        """Loss per galaxy and question, or (`"mean"`) the batch's: summed over questions, averaged."""
        return self.vote_loss(self(batch["image"]), batch["votes"], reduction)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._losses(batch, "mean")
        # every rank must take the same decision, or DDP waits forever on the rank that stopped
        nonfinite = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        if nonfinite:
            self._skip_update = self._nonfinite_loss(loss, batch)
            return loss
        self.log(
            "train_loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(batch["votes"]),
        )
        return loss

    def _nonfinite_loss(self, loss: torch.Tensor, batch: dict[str, Any]) -> bool:
        """Raise (policy `error`) or count the step as skipped (policy `skip`)."""
        ids = ", ".join(self._batch_ids("train", batch)[:20])
        where = f"the training loss is {loss.item()} at step {self.global_step}; galaxies in the batch: {ids}"
        if self.hparams.on_nonfinite_loss == "error":
            raise NonFiniteLossError(
                f"{where}. Check their images and votes, or lower learning_rate, or set "
                "on_nonfinite_loss='skip' to skip such steps; the weights were not updated with this loss"
            )
        self.skipped_steps += 1
        log.warning("%s: step skipped (%d so far), the weights were not updated", where, self.skipped_steps)
        self.log("skipped_nonfinite_steps", float(self.skipped_steps), reduce_fx="max", batch_size=1)
        return True

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """The default step, unless training_step found a non-finite loss: then no update at all."""
        result = optimizer_closure()  # forward + backward (collective under DDP, so every rank runs it)
        if self._skip_update:
            self._skip_update = False
            optimizer.zero_grad()
            return
        optimizer.step(closure=lambda: result)

    def _evaluate(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        per_question = self._losses(batch)
        loss = per_question.sum(dim=1).mean()
        size = len(batch["votes"])
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=size)
        for name, value in zip(self.schema.question_names, per_question.mean(dim=0), strict=True):
            self.log(f"{stage}_loss/{name}", value, sync_dist=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def _batch_ids(self, split: str, batch: dict[str, Any]) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "ids"):
            return [f"row {int(i)}" for i in batch["index"]]
        return datamodule.ids(split, batch["index"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
