"""What the NVS task writes: image grids, PNGs, turntable GIFs, and the prediction writer callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid


def to_uint8(images: Tensor) -> Tensor:
    """Float images [..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3] on the CPU (what PIL writes)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu()


def image_grid(inputs: Tensor, targets: Tensor, predictions: Tensor) -> Tensor:
    """One row per scene: its input views | target views | predicted target views.

    inputs [S, Vi, 3, H, W], targets and predictions [S, Vt, 3, H, W], floats in [0, 1] -> [3, H', W'].
    """
    rows = torch.cat([inputs.float(), targets.float(), predictions.float().clamp(0, 1)], dim=1)
    return make_grid(rows.flatten(0, 1).cpu(), nrow=rows.shape[1], padding=2, pad_value=1.0)


def save_png(image: Tensor | np.ndarray, path: str | Path) -> None:
    """A uint8 [H, W, 3] image, or a float [3, H, W] one in [0, 1], as PNG."""
    if isinstance(image, Tensor) and image.is_floating_point():
        image = to_uint8(image)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image), mode="RGB").save(path)


def save_gif(frames: Tensor | np.ndarray, path: str | Path, fps: float = 12.0) -> None:
    """uint8 frames [T, H, W, 3] as a looping GIF."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f, mode="RGB") for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


class NVSPredictionWriter(BasePredictionWriter):
    """Writes what NVSModule.predict_step returns, per scene, into `output_dir/<scene key>/`:
    view_000.png ... (rendered target views), gt_000.png ... (their ground truth), input_000.png ...,
    and turntable.gif."""

    def __init__(self, output_dir: str = "outputs/predict", fps: float = 12.0):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.fps = fps

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        for i, key in enumerate(prediction["key"]):
            scene = self.output_dir / str(key)
            for name in ("views", "ground_truth", "inputs"):
                prefix = {"views": "view", "ground_truth": "gt", "inputs": "input"}[name]
                for v, image in enumerate(prediction[name][i]):
                    save_png(image, scene / f"{prefix}_{v:03d}.png")
            save_gif(prediction["turntable"][i], scene / "turntable.gif", self.fps)
