"""Training logic of the novel-view-synthesis task (the network is lact.models.nvs.NVSNet).

Batches (from datamodules.nvs) are dicts of
    input_images [B, Vi, 3, H, W] float in [0, 1], input_intrinsics [B, Vi, 4], input_w2c [B, Vi, 4, 4]
    target_images [B, Vt, 3, H, W], target_intrinsics [B, Vt, 4], target_w2c [B, Vt, 4, 4], key: list[str]
(OpenCV cameras, see lact/geometry.py).

Loss MSE + lpips_weight * LPIPS from `lpips_start_step` on; PSNR and SSIM with data_range 1; AdamW with weight
decay on matrices only, linear warmup then cosine; gradient-norm clipping, and the optimizer step is skipped
(logged as train/skipped_steps) when the norm is non-finite or above `skip_grad_norm`.

Scale (DESIGN §6): under Lightning's `ModelParallelStrategy(tensor_parallel_size=1)`, `configure_model` shards
the network with FSDP2 (modules/scale.py), one unit per NVSBlock and then the root (tokenizer and decoder);
`model.activation_checkpointing` recomputes each block in backward, `fsdp_param_dtype: bfloat16` gathers and computes
in bf16 from fp32 weights (the cameras' rays are still computed in fp32). Without that strategy (one
device, DDP) nothing is sharded.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lact.geometry import camera_centers, orbit_cameras
from lact.models.nvs import NVSConfig, NVSNet
from modules.lpips import load_lpips
from modules.nvs_outputs import image_grid, to_uint8
from modules.scale import parse_param_dtype, shard_model


def nearest_input_view(input_images: Tensor, input_w2c: Tensor, target_w2c: Tensor) -> Tensor:
    """The baseline: for every target camera, copy the input view whose camera centre is closest.

    input_images [B, Vi, 3, H, W], input_w2c [B, Vi, 4, 4], target_w2c [B, Vt, 4, 4] -> [B, Vt, 3, H, W].
    """
    distances = torch.cdist(camera_centers(target_w2c).float(), camera_centers(input_w2c).float())
    nearest = distances.argmin(dim=-1)  # [B, Vt]
    return input_images[torch.arange(input_images.shape[0], device=nearest.device)[:, None], nearest]


class WarmupCosine:
    """LR multiplier: linear warmup over `warmup` steps, then cosine from 1 down to `min_ratio` at `total`.
    A callable object rather than a lambda so that LambdaLR saves and restores it in checkpoints."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class NVSModule(LightningModule):
    """Args:
    model: the network's sizes (a dict with NVSConfig's fields also works: checkpoints store a dict).
    lr, weight_decay, betas: AdamW; weight decay on parameters with 2 or more dimensions only.
    warmup_steps, total_steps, min_lr_ratio: the schedule; total_steps None = the trainer's step budget.
    grad_clip: clip the global gradient norm to this (0 = no clipping).
    skip_grad_norm: skip the optimizer step when the (unclipped) gradient norm exceeds it or is not finite.
    lpips_weight, lpips_start_step: add lpips_weight * LPIPS to the loss from this global step on.
    lpips_metric: also report LPIPS in validation. LPIPS needs its backbone weights on disk (modules/lpips.py).
    log_images: scenes of the first validation batch shown in TensorBoard (inputs | targets | predictions).
    turntable_frames, render_chunk: predict renders a turntable of this many frames, this many views per call.
    fsdp_param_dtype: under FSDP2 (ModelParallelStrategy), the dtype parameters are gathered and computed in
        ("bfloat16"); None for their own dtype.
    """

    def __init__(
        self,
        model: NVSConfig | None = None,
        lr: float = 4e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        grad_clip: float = 1.0,
        skip_grad_norm: float = 100.0,
        lpips_weight: float = 0.0,
        lpips_start_step: int = 0,
        lpips_metric: bool = False,
        lpips_net: str = "alex",
        log_images: int = 4,
        turntable_frames: int = 24,
        render_chunk: int = 8,
        fsdp_param_dtype: str | None = None,
    ):
        super().__init__()
        parse_param_dtype(fsdp_param_dtype)  # fails here on a bad name, not at sharding time
        config = NVSConfig(**model) if isinstance(model, dict) else (model or NVSConfig())
        self.save_hyperparameters()
        self.hparams["model"] = asdict(config)  # plain data, so checkpoints load with weights_only=True
        self.net = NVSNet(config)
        # Built now, so that missing backbone weights fail at start instead of at lpips_start_step. Kept out
        # of the module tree (a list): the frozen metric is neither trained nor saved in checkpoints.
        self._lpips = [load_lpips(lpips_net)] if lpips_weight > 0 or lpips_metric else []
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))  # mean of per-image PSNR
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_psnr_nearest = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.skipped_steps = 0

    # ------------------------------------------------------------------------------------------ scale

    def configure_model(self) -> None:
        """FSDP2 under ModelParallelStrategy: one shard unit per block, then the root (tokenizer, decoder).
        `reconstruct` and `render` (predict) gather parameters like `forward`; the root's camera inputs are
        not cast to the parameter dtype."""
        shard_model(
            self.net,
            self.net.blocks,
            self.device_mesh,
            param_dtype=parse_param_dtype(self.hparams.fsdp_param_dtype),
            cast_root_inputs=False,
            forward_methods=("reconstruct", "render"),
        )

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

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip to `grad_clip`; drop all gradients (so AdamW leaves parameters and moments untouched) when
        the norm is non-finite or above `skip_grad_norm`."""
        if gradient_clip_val:
            raise ValueError(
                "NVSModule clips gradients itself (model.init_args.grad_clip, skip_grad_norm): "
                f"leave trainer.gradient_clip_val unset, got {gradient_clip_val}"
            )
        params = [p for p in self.parameters() if p.grad is not None]
        max_norm = self.hparams.grad_clip if self.hparams.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.log("train/grad_norm", norm)
        if not torch.isfinite(norm) or norm > self.hparams.skip_grad_norm:
            for p in params:
                p.grad = None  # torch optimizers skip parameters without a gradient
            self.skipped_steps += 1
            rank_zero_warn(
                f"step {self.global_step}: gradient norm {norm.item():.4g} is non-finite or above "
                f"skip_grad_norm={self.hparams.skip_grad_norm}; optimizer step skipped "
                f"({self.skipped_steps} so far)"
            )
        self.log("train/skipped_steps", float(self.skipped_steps))

    def configure_optimizers(self):
        decay = [p for p in self.net.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.net.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
        )
        total = self.hparams.total_steps or self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "the cosine schedule needs a length: set model.init_args.total_steps or trainer.max_steps"
            )
        schedule = WarmupCosine(self.hparams.warmup_steps, int(total), self.hparams.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nvs_skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("nvs_skipped_steps", 0)

    # ------------------------------------------------------------------------------------------ validation

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred = self(batch).float().clamp(0, 1)
        target = batch["target_images"].float()
        flat_pred, flat_target = pred.flatten(0, 1), target.flatten(0, 1)
        nearest = nearest_input_view(batch["input_images"], batch["input_w2c"], batch["target_w2c"])
        self.val_psnr(flat_pred, flat_target)
        self.val_ssim(flat_pred, flat_target)
        self.val_psnr_nearest(nearest.float().flatten(0, 1), flat_target)
        size = len(pred)
        self.log("val/loss", F.mse_loss(pred, target), sync_dist=True, batch_size=size)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=size)
        self.log("val/ssim", self.val_ssim, batch_size=size)
        self.log("val/psnr_nearest_view", self.val_psnr_nearest, batch_size=size)
        if self._lpips and self.hparams.lpips_metric:
            lp = self.lpips().net(flat_pred, flat_target, normalize=True).mean()
            self.log("val/lpips", lp, sync_dist=True, batch_size=size)
        if batch_idx == 0:  # the validation loader is deterministic: the same scenes at every validation
            self.log_image_grid(batch, pred)

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
        """Render cameras [B, V, 4], [B, V, 4, 4] of reconstructed scenes, `render_chunk` views per call."""
        chunk = max(1, self.hparams.render_chunk)
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
