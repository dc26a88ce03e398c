"""Image augmentation as one batched affine resample on the model's device.

The loader hands over whole uint8 images; here each image of the batch gets its own random
rotation (any angle, zero fill, as Zoobot rotates the full image first), random resized crop
(area fraction in `crop_scale_bounds`, aspect ratio log-uniform in `crop_ratio_bounds`, as
torchvision's RandomResizedCrop) and horizontal flip. The three compose into one 2x3 affine map per
image, so the pixels are resampled once (bilinear) instead of three times on a CPU worker.
A vertical flip is not needed: a horizontal flip followed by a uniform rotation already covers it.

Evaluation (validation, test, prediction) uses a deterministic transform: a centred square crop
with the mean area fraction of the training crops, no rotation, no flip, resized to `resize_size`,
so evaluated galaxies appear at the same mean scale as in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from zoobot_hpc.errors import InputError


class AugmentationError(InputError):
    """Invalid crop bounds or output size."""


def check_bounds(
    resize_size: int, crop_scale_bounds: Sequence[float], crop_ratio_bounds: Sequence[float]
) -> None:
    if not isinstance(resize_size, int) or isinstance(resize_size, bool) or resize_size < 8:
        raise AugmentationError(f"resize_size={resize_size!r}: use a whole number of pixels >= 8, e.g. 224")
    low, high = _pair(crop_scale_bounds, "crop_scale_bounds")
    if not 0 < low <= high <= 1:
        raise AugmentationError(
            f"crop_scale_bounds={tuple(crop_scale_bounds)}: need 0 < low <= high <= 1 "
            "(fractions of the image area), e.g. (0.7, 0.8)"
        )
    low, high = _pair(crop_ratio_bounds, "crop_ratio_bounds")
    if not 0 < low <= high:
        raise AugmentationError(
            f"crop_ratio_bounds={tuple(crop_ratio_bounds)}: need 0 < low <= high (width / height), "
            "e.g. (0.9, 1.1)"
        )


def _pair(bounds: Sequence[float], name: str) -> tuple[float, float]:
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError) as err:
        raise AugmentationError(f"{name}={bounds!r}: give two numbers (low, high)") from err
    return low, high


class GalaxyAugment(torch.nn.Module):
    """uint8 (B, C, H, W) images → float (B, C, resize_size, resize_size) in [0, 1]."""

    def __init__(
        self,
        resize_size: int,
        crop_scale_bounds: Sequence[float] = (0.7, 0.8),
        crop_ratio_bounds: Sequence[float] = (0.9, 1.1),
    ) -> None:
        super().__init__()
        check_bounds(resize_size, crop_scale_bounds, crop_ratio_bounds)
        self.resize_size = resize_size
        self.scale_bounds = tuple(float(b) for b in crop_scale_bounds)
        self.log_ratio_bounds = tuple(math.log(float(b)) for b in crop_ratio_bounds)

    def sample_params(self, batch_size: int, device: torch.device, generator=None) -> dict[str, torch.Tensor]:
        """Random crop area fraction, aspect ratio, centre (as a fraction of the free room), angle, flip."""

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch_size, device=device, generator=generator)

        return {
            "scale": uniform(*self.scale_bounds),
            "ratio": torch.exp(uniform(*self.log_ratio_bounds)),
            "offset_x": uniform(-1.0, 1.0),
            "offset_y": uniform(-1.0, 1.0),
            "angle": uniform(0.0, 2 * math.pi),
            "flip": torch.rand(batch_size, device=device, generator=generator) < 0.5,
        }

    def eval_params(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        zeros = torch.zeros(batch_size, device=device)
        return {
            "scale": torch.full((batch_size,), sum(self.scale_bounds) / 2, device=device),
            "ratio": torch.ones(batch_size, device=device),
            "offset_x": zeros,
            "offset_y": zeros,
            "angle": zeros,
            "flip": torch.zeros(batch_size, dtype=torch.bool, device=device),
        }

    @staticmethod
    def affine_matrices(params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """(B, 2, 3) maps from output coordinates to input coordinates, as `F.affine_grid` wants.

        Crop sizes are clamped to the image (torchvision falls back to a centre crop instead; the
        default bounds never reach either case).
        """
        area = params["scale"] * height * width
        crop_w = torch.sqrt(area * params["ratio"]).clamp(max=width)
        crop_h = torch.sqrt(area / params["ratio"]).clamp(max=height)
        centre_x = params["offset_x"] * (width - crop_w) / 2  # pixels from the image centre
        centre_y = params["offset_y"] * (height - crop_h) / 2
        cos, sin = torch.cos(params["angle"]), torch.sin(params["angle"])
        flip = torch.where(params["flip"], -1.0, 1.0).to(crop_w.dtype)
        half_w, half_h = crop_w / 2 * flip, crop_h / 2
        # output (u, v) in [-1, 1] -> crop box in the rotated image -> rotate back -> normalise by half size
        a11, a12 = cos * half_w, sin * half_h
        a21, a22 = -sin * half_w, cos * half_h
        t1 = cos * centre_x + sin * centre_y
        t2 = -sin * centre_x + cos * centre_y
        rows_x = torch.stack([a11, a12, t1], dim=1) / (width / 2)
        rows_y = torch.stack([a21, a22, t2], dim=1) / (height / 2)
        return torch.stack([rows_x, rows_y], dim=1)

    def forward(self, images: torch.Tensor, train: bool, generator=None) -> torch.Tensor:
        batch, channels, height, width = images.shape
        params = (
            self.sample_params(batch, images.device, generator)
            if train
            else self.eval_params(batch, images.device)
        )
        pixels = images.float().div_(255.0)
        # cheap anti-aliasing: average-pool first when the output is at least 2x smaller
        factor = min(height, width) // self.resize_size
        if factor >= 2:
            pixels = F.avg_pool2d(pixels, kernel_size=factor, stride=factor)
        theta = self.affine_matrices(params, height, width)
        grid = F.affine_grid(
            theta, [batch, channels, self.resize_size, self.resize_size], align_corners=False
        )
        return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
