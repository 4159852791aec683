"""Training logic of the novel-view-synthesis task (the network is lact.models.nvs.NVSNet).

Batches (from datamodules.nvs) are dicts of
    input_images [B, Vi, 3, H, W] float in [0, 1], input_intrinsics [B, Vi, 4], input_w2c [B, Vi, 4, 4]
    target_images [B, Vt, 3, H, W], target_intrinsics [B, Vt, 4], target_w2c [B, Vt, 4, 4], key: list[str]
(OpenCV cameras, see lact/geometry.py).

Loss MSE + chroma_weight * chroma MSE + lpips_weight * LPIPS from `lpips_start_step` on; PSNR and SSIM with data_range 1. Optimisation,
clipping and step skipping are the shared layer of modules/task.py. `test` scores the held-out views
(the datamodule's test_dataloader): PSNR, SSIM, LPIPS when its backbone weights are on disk, and the same
for the nearest-input-view baseline, as test/<metric> and test/<metric>_nearest_view.

Scale (docs/architecture.md, Training, checkpoints and scale): under Lightning's `ModelParallelStrategy(tensor_parallel_size=1)`, `configure_model` shards
the network with FSDP2 (modules/scale.py), one unit per NVSBlock and then the root (tokenizer and decoder);
`net.activation_checkpointing` recomputes each block in backward, `fsdp_param_dtype: bfloat16` gathers and computes
in bf16 from fp32 weights (the cameras' rays are still computed in fp32). Without that strategy (one
device, DDP) nothing is sharded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lact.geometry import camera_centers, orbit_cameras
from lact.models.nvs import NVSConfig, NVSNet
from modules.lpips import backbone_path, load_lpips
from modules.nvs_outputs import image_grid, to_uint8
from modules.task import OptimConfig, TaskModule, as_config


def fp32_scores(device: torch.device):
    """Scores computed in fp32 under mixed precision (`trainer.precision: bf16-mixed`): autocast would run
    SSIM's Gaussian filter and LPIPS in bf16 (the demo's nearest-view SSIM moved from 0.764 to 0.749)."""
    return torch.autocast(device.type, enabled=False)


def nearest_input_view(input_images: Tensor, input_w2c: Tensor, target_w2c: Tensor) -> Tensor:
    """The baseline: for every target camera, copy the input view whose camera centre is closest.

    input_images [B, Vi, 3, H, W], input_w2c [B, Vi, 4, 4], target_w2c [B, Vt, 4, 4] -> [B, Vt, 3, H, W].
    """
    distances = torch.cdist(camera_centers(target_w2c).float(), camera_centers(input_w2c).float())
    nearest = distances.argmin(dim=-1)  # [B, Vt]
    return input_images[torch.arange(input_images.shape[0], device=nearest.device)[:, None], nearest]


def chroma_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared chroma error: the error of every pixel minus its mean over the RGB channels, squared.

    pred, target [..., 3, H, W] -> a scalar. Zero when the prediction is off by the same amount in every
    channel (a brightness error), large when it has the wrong hue: a grey prediction of a red object."""
    error = pred - target
    return (error - error.mean(dim=-3, keepdim=True)).square().mean()


def object_mask(images: Tensor, background: float = 1.0, tolerance: float = 0.02) -> Tensor:
    """Pixels that are not the (white) background: [..., 3, H, W] -> bool [..., 1, H, W]."""
    return ((images - background).abs() > tolerance).any(dim=-3, keepdim=True)


@torch.no_grad()
def colour_transfer(net, batch: dict) -> float:
    """How much of the input views' colour reaches the predictions: swap the red and blue channels of the
    input views and measure the mean absolute change of the predicted target pixels on the object (the
    targets' non-background pixels) over the mean absolute change of the inputs on their object pixels.

    About 1 for a model that carries colour from its inputs (the swapped scene's targets swap too), 0 for one
    that predicts the same colours whatever the inputs show. net: an NVSNet (or anything called like it);
    batch: the NVS batch dict (input_images, input_intrinsics, input_w2c, target_images, target_intrinsics,
    target_w2c), images in [0, 1] on a white background. Returns nan when no input pixel changes.
    """
    inputs, targets = batch["input_images"].float(), batch["target_images"].float()
    cameras = (batch["input_intrinsics"], batch["input_w2c"], batch["target_intrinsics"], batch["target_w2c"])
    swapped = inputs.flip(-3)  # RGB -> BGR
    pred = net(inputs, *cameras[:2], *cameras[2:]).float()
    pred_swapped = net(swapped, *cameras[:2], *cameras[2:]).float()
    target_mask, input_mask = object_mask(targets), object_mask(inputs)
    change = ((pred_swapped - pred).abs() * target_mask).sum() / (3 * target_mask.sum()).clamp(min=1)
    input_change = ((swapped - inputs).abs() * input_mask).sum() / (3 * input_mask.sum()).clamp(min=1)
    return (change / input_change).item() if input_change > 0 else float("nan")


class NVSModule(TaskModule):
    """Args:
    net: the network's sizes (NVSConfig; a dict with its fields also works: checkpoints store a dict).
    optim: OptimConfig (lr, betas, weight decay, warmup + cosine, grad_clip, skip_grad_norm, ...).
    chroma_weight: add chroma_weight * chroma_mse (the error's part that is not the same in every channel) to
        the loss. Object colours are a small part of the MSE of a white-background render, and a grey guess
        already removes most of it, so without it a small model learns colour late; with 4 it learns it
        several times sooner (benchmarks/README.md, colour probes).
    lpips_weight, lpips_start_step: add lpips_weight * LPIPS to the loss from this global step on.
    lpips_metric: also report LPIPS in validation and test. LPIPS needs its backbone weights on disk
        (modules/lpips.py); `test` reports it whenever they are there.
    log_images: scenes of the first validation batch shown in TensorBoard (inputs | targets | predictions).
    turntable_frames: predict renders a turntable of this many frames.
    render_chunk: predict renders this many views per `render` call; None (default) renders all the views of
        a batch (its targets, then its turntable) in one call each, which is several times cheaper per view
        than one call per view for small models (benchmarks/nvs_render.py); set it to bound memory.
    fsdp_param_dtype: under FSDP2 (ModelParallelStrategy), the dtype parameters are gathered and computed in
        ("bfloat16"); None for their own dtype.
    """

    # FSDP2: `reconstruct` and `render` (predict) gather parameters like `forward`; the root's camera
    # inputs keep their dtype (rays are computed in fp32).
    forward_methods = ("reconstruct", "render")
    cast_root_inputs = False
    throughput_unit = "views"

    def __init__(
        self,
        net: NVSConfig | None = None,
        optim: OptimConfig | None = None,
        chroma_weight: float = 0.0,
        lpips_weight: float = 0.0,
        lpips_start_step: int = 0,
        lpips_metric: bool = False,
        lpips_net: str = "alex",
        log_images: int = 4,
        turntable_frames: int = 24,
        render_chunk: int | None = None,
        fsdp_param_dtype: str | None = None,
    ):
        super().__init__(optim, fsdp_param_dtype)
        if (
            isinstance(chroma_weight, bool)
            or not isinstance(chroma_weight, (int, float))
            or chroma_weight < 0
        ):
            raise ValueError(f"NVSModule.chroma_weight must be a number >= 0, got {chroma_weight!r}")
        self.net = NVSNet(as_config(NVSConfig, net))
        # Built now, so that missing backbone weights fail at start instead of at lpips_start_step. Kept out
        # of the module tree (a list): the frozen metric is neither trained nor saved in checkpoints.
        self._lpips = [load_lpips(lpips_net)] if lpips_weight > 0 or lpips_metric else []
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))  # mean of per-image PSNR
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_psnr_nearest = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.test_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.test_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.test_psnr_nearest = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.test_ssim_nearest = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.test_lpips = MeanMetric()
        self.test_lpips_nearest = MeanMetric()

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, batch: dict) -> Tensor:
        """Predicted target views [B, Vt, 3, H, W] in (0, 1)."""
        return self.net(
            batch["input_images"],
            batch["input_intrinsics"],
            batch["input_w2c"],
            batch["target_intrinsics"],
            batch["target_w2c"],
        )

    def throughput_items(self, batch: dict) -> int:
        """Views per batch: input views read plus target views rendered."""
        return batch["input_images"].shape[:2].numel() + batch["target_images"].shape[:2].numel()

    def lpips(self):
        metric = self._lpips[0]
        if metric.device != self.device:
            metric.to(self.device)
        return metric

    def lpips_active(self) -> bool:
        return self.hparams.lpips_weight > 0 and self.global_step >= self.hparams.lpips_start_step

    # ------------------------------------------------------------------------------------------ training

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        pred = self(batch).float()
        target = batch["target_images"].float()
        mse = F.mse_loss(pred, target)
        loss = mse
        size = len(pred)
        if self.hparams.chroma_weight > 0:
            chroma = chroma_mse(pred, target)
            loss = loss + self.hparams.chroma_weight * chroma
            self.log("train/chroma_mse", chroma, batch_size=size)
        if self.lpips_active():
            # metric.net is the LPIPS network itself: per-image distances, differentiable in the input.
            lp = self.lpips().net(pred.flatten(0, 1), target.flatten(0, 1), normalize=True).mean()
            loss = loss + self.hparams.lpips_weight * lp
            self.log("train/lpips", lp, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log(
            "train/psnr", -10 * torch.log10(mse.detach().clamp(min=1e-10)), prog_bar=True, batch_size=size
        )
        return loss

    # ------------------------------------------------------------------------------------------ validation

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred = self(batch).float().clamp(0, 1)
        target = batch["target_images"].float()
        flat_pred, flat_target = pred.flatten(0, 1), target.flatten(0, 1)
        nearest = nearest_input_view(batch["input_images"], batch["input_w2c"], batch["target_w2c"])
        size = len(pred)
        with fp32_scores(pred.device):
            self.val_psnr(flat_pred, flat_target)
            self.val_ssim(flat_pred, flat_target)
            self.val_psnr_nearest(nearest.float().flatten(0, 1), flat_target)
            self.log("val/loss", F.mse_loss(pred, target), sync_dist=True, batch_size=size)
            if self._lpips and self.hparams.lpips_metric:
                lp = self.lpips().net(flat_pred, flat_target, normalize=True).mean()
                self.log("val/lpips", lp, sync_dist=True, batch_size=size)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=size)
        self.log("val/ssim", self.val_ssim, batch_size=size)
        self.log("val/psnr_nearest_view", self.val_psnr_nearest, batch_size=size)
        if batch_idx == 0:  # the validation loader is deterministic: the same scenes at every validation
            self.log_image_grid(batch, pred)
            # two more passes over one batch: whether the inputs' colours reach the predictions
            self.log("val/colour_transfer", colour_transfer(self.net, batch), batch_size=size)

    # ------------------------------------------------------------------------------------------ test

    def on_test_start(self) -> None:
        # LPIPS joins the test scores whenever its backbone weights are on disk (never a download).
        if not self._lpips and backbone_path(self.hparams.lpips_net).is_file():
            self._lpips = [load_lpips(self.hparams.lpips_net)]

    @torch.no_grad()
    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Scores the held-out target views of the batch and the nearest-input-view baseline."""
        pred = self(batch).float().clamp(0, 1)
        target = batch["target_images"].float()
        nearest = nearest_input_view(batch["input_images"], batch["input_w2c"], batch["target_w2c"]).float()
        flat_target = target.flatten(0, 1)
        size = len(pred)
        self.log("test/loss", F.mse_loss(pred, target), sync_dist=True, batch_size=size)
        for suffix, images, psnr, ssim, lpips in (
            ("", pred, self.test_psnr, self.test_ssim, self.test_lpips),
            (
                "_nearest_view",
                nearest,
                self.test_psnr_nearest,
                self.test_ssim_nearest,
                self.test_lpips_nearest,
            ),
        ):
            flat = images.flatten(0, 1)
            with fp32_scores(flat.device):
                psnr(flat, flat_target)
                ssim(flat, flat_target)
                if self._lpips:
                    lpips(self.lpips().net(flat, flat_target, normalize=True).flatten())
            self.log(f"test/psnr{suffix}", psnr, batch_size=size)
            self.log(f"test/ssim{suffix}", ssim, batch_size=size)
            if self._lpips:
                self.log(f"test/lpips{suffix}", lpips, batch_size=size)

    def log_image_grid(self, batch: dict, pred: Tensor) -> None:
        count = self.hparams.log_images
        if count <= 0 or self.trainer.global_rank != 0:
            return
        grid = image_grid(batch["input_images"][:count], batch["target_images"][:count], pred[:count])
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/inputs|targets|predictions", grid, self.global_step)

    # ------------------------------------------------------------------------------------------ predict

    @torch.no_grad()
    def render_views(self, state, intrinsics: Tensor, w2c: Tensor) -> Tensor:
        """Render cameras [B, V, 4], [B, V, 4, 4] of reconstructed scenes, `render_chunk` views per call
        (None: all V at once)."""
        chunk = max(1, self.hparams.render_chunk or w2c.shape[1])
        return torch.cat(
            [
                self.net.render(state, intrinsics[:, i : i + chunk], w2c[:, i : i + chunk])
                for i in range(0, w2c.shape[1], chunk)
            ],
            dim=1,
        )

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Reconstruct every scene once from its input views, then render from that state its target
        cameras and a turntable around it. Returns uint8 [B, V, H, W, 3] images (see NVSPredictionWriter)."""
        state = self.net.reconstruct(batch["input_images"], batch["input_intrinsics"], batch["input_w2c"])
        views = self.render_views(state, batch["target_intrinsics"], batch["target_w2c"])
        frames = self.hparams.turntable_frames
        orbit = torch.stack([orbit_cameras(w2c.float().cpu(), frames) for w2c in batch["input_w2c"]])
        orbit = orbit.to(batch["input_w2c"])
        orbit_intrinsics = batch["input_intrinsics"][:, :1].expand(-1, frames, -1)
        turntable = self.render_views(state, orbit_intrinsics, orbit)
        return {
            "key": list(batch["key"]),
            "views": to_uint8(views),
            "ground_truth": to_uint8(batch["target_images"]),
            "inputs": to_uint8(batch["input_images"]),
            "turntable": to_uint8(turntable),
        }
