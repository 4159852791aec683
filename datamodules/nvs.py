"""Novel-view-synthesis batches from scene shards: per scene, pick views and split them into inputs and targets.

Every sample of a batch (after collation, B scenes) is
    input_images  [B, Vi, 3, H, W] float in [0, 1]    input_intrinsics  [B, Vi, 4]    input_w2c  [B, Vi, 4, 4]
    target_images [B, Vt, 3, H, W]                     target_intrinsics [B, Vt, 4]    target_w2c [B, Vt, 4, 4]
    input_views, target_views [B, V*] int64 (indices into the scene's views), key, shard: lists of str
with OpenCV cameras (lact/geometry.py), resized to `image_size` when the shards hold another size.

Training draws fresh views for every visit of a scene from a generator seeded by (`seed`, epoch, rank,
worker, cycle of the resampled stream, scene key), `datamodules.shards.visit_generator`, never from the
global RNG. The epoch is the trainer's global step when the pass starts, and the loader's position within
the pass is checkpointed: a resumed run (also mid-epoch) draws the same scenes with the same views as the
uninterrupted run, and every epoch draws new views. Validation and prediction are deterministic:
the views of a scene depend only on its key, so every validation sees the same inputs and targets.
`held_out_views` reserves view indices of every scene for evaluation only: training never sees them,
evaluation renders them from inputs drawn among the other views (one object, some of its views held out).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.base import ShardDataModule, check_sizes
from datamodules.readers import scene_dataset, val_loader
from lact.geometry import normalize_cameras, scale_intrinsics


def select_views(
    num_views: int,
    num_inputs: int,
    num_targets: int | None,
    generator: torch.Generator | None,
    held_out: Sequence[int] = (),
    evaluate: bool = False,
    scene: str = "?",
) -> tuple[Tensor, Tensor]:
    """(input view indices [Vi], target view indices [Vt]) of a scene with `num_views` views, disjoint.

    Without held-out views: a random permutation (from `generator`), inputs first, then targets. With them:
    training draws both sets from the other views; evaluation (`evaluate`) takes the first `num_targets`
    held-out views (all of them when None) as targets and draws the inputs from the other views.
    """
    held_out = [int(v) for v in held_out]
    bad = [v for v in held_out if not 0 <= v < num_views]
    if bad:
        raise ValueError(f"scene {scene}: held_out_views {bad} are not view indices of its {num_views} views")
    pool = [v for v in range(num_views) if v not in set(held_out)]
    where = " outside held_out_views" if held_out else ""
    if evaluate and held_out:
        if num_targets is not None and num_targets > len(held_out):
            raise ValueError(
                f"scene {scene}: {num_targets} target views asked for, held_out_views has {len(held_out)}"
            )
        targets = torch.tensor(held_out[:num_targets], dtype=torch.long)
        needed, wanted = num_inputs, f"num_input_views={num_inputs}"
    else:
        if num_targets is None:
            raise ValueError("num_targets may be None only when evaluating with held_out_views")
        targets = None
        needed = num_inputs + num_targets
        wanted = f"num_input_views + num_target_views = {num_inputs} + {num_targets}"
    if needed > len(pool):
        raise ValueError(f"scene {scene} holds {len(pool)} views{where}, fewer than the {wanted} asked for")
    order = torch.tensor(pool, dtype=torch.long)[torch.randperm(len(pool), generator=generator)]
    return order[:num_inputs], (order[num_inputs:needed] if targets is None else targets)


def prepare_views(
    images: Tensor, intrinsics: Tensor, image_size: tuple[int, int] | None
) -> tuple[Tensor, Tensor]:
    """uint8 images [V, H, W, 3] -> float [V, 3, H', W'] in [0, 1] at `image_size` (H', W') (None: as stored),
    with the intrinsics [V, 4] of the resized images."""
    images = images.permute(0, 3, 1, 2).float() / 255
    if image_size is None or tuple(images.shape[-2:]) == tuple(image_size):
        return images, intrinsics
    height, width = images.shape[-2:]
    if height % image_size[0] == 0 and width % image_size[1] == 0:  # integer downscale: exact box average
        images = F.interpolate(images, size=tuple(image_size), mode="area")
    else:
        images = F.interpolate(images, size=tuple(image_size), mode="bilinear", antialias=True)
    scaled = scale_intrinsics(intrinsics, image_size[1] / width, image_size[0] / height)
    return images.clamp(0, 1), scaled


def nvs_sample(
    sample: dict,
    generator: torch.Generator | None = None,
    *,
    train: bool,
    num_input_views: int,
    num_target_views: int | None,
    image_size: tuple[int, int] | None,
    held_out_views: Sequence[int],
    normalize_poses: bool,
) -> dict:
    """One decoded scene (images uint8 [V, H, W, 3], intrinsics [V, 4], w2c [V, 4, 4], key, shard) -> one
    NVS sample (see the module docstring). Module-level, so DataLoader workers can pickle it.

    Training draws the views from `generator` (the reader's per-visit generator; None: the global RNG).
    Evaluation ignores it and seeds a generator by the scene key, so a scene always gets the same views."""
    key = sample["key"]
    if not train:
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    inputs, targets = select_views(
        len(sample["w2c"]),
        num_input_views,
        num_target_views,
        generator,
        held_out=held_out_views if held_out_views else (),
        evaluate=not train,
        scene=f"{key!r} (shard {sample.get('shard', '?')})",
    )
    views = torch.cat([inputs, targets])
    images, intrinsics = prepare_views(sample["images"][views], sample["intrinsics"][views], image_size)
    w2c = sample["w2c"][views].float()
    if normalize_poses:
        w2c = normalize_cameras(w2c, w2c[: len(inputs)])
    n = len(inputs)
    return {
        "input_images": images[:n],
        "input_intrinsics": intrinsics[:n].float(),
        "input_w2c": w2c[:n],
        "target_images": images[n:],
        "target_intrinsics": intrinsics[n:].float(),
        "target_w2c": w2c[n:],
        "input_views": inputs,
        "target_views": targets,
        "key": key,
        "shard": sample.get("shard", "?"),
    }


class NVSDataModule(ShardDataModule):
    """Scene shards -> NVS batches.

    Args:
        train_shards, val_shards, predict_shards: shard specs (a folder, brace pattern, glob or a list);
            predict_shards defaults to val_shards.
        test_shards: the held-out scenes `train.py test` scores (default val_shards).
        image_size: (H, W) or one int for square images the model sees; None keeps the stored size.
        num_input_views, num_target_views: views per scene in training (and evaluation, unless overridden).
        eval_target_views: target views per scene in validation and prediction (None: num_target_views, or
            all held_out_views when those are set).
        held_out_views: view indices that training never uses and evaluation renders.
        normalize_poses: express each sample's cameras in the frame of its input views (scene-level data).
        seed: seeds the training stream and the training views (see the module docstring).
        curriculum: scene shards trained on before train_shards, by global step (e.g. scenes of one
            primitive first: configs/nvs/demo.yaml); see datamodules.base.ShardDataModule.
        Other arguments: the shard reading of datamodules.base.ShardDataModule.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        predict_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        image_size: int | tuple[int, int] | None = None,
        num_input_views: int = 2,
        num_target_views: int = 1,
        eval_target_views: int | None = None,
        held_out_views: list[int] | None = None,
        normalize_poses: bool = False,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        batches_per_epoch: int = 1000,
        shuffle_buffer: int = 64,
        seed: int = 0,
        max_bad_samples: int = 16,
        pin_memory: bool = False,
        curriculum: list[dict] | None = None,
    ):
        check_sizes(
            type(self).__name__,
            image_size=image_size,
            num_input_views=num_input_views,
            num_target_views=num_target_views,
            eval_target_views=eval_target_views,
        )
        check_sizes(type(self).__name__, 0, held_out_views=held_out_views)
        super().__init__(
            train_shards,
            val_shards,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            batches_per_epoch=batches_per_epoch,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            max_bad_samples=max_bad_samples,
            pin_memory=pin_memory,
            curriculum=curriculum,
        )
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.predict_shards, self.test_shards = predict_shards, test_shards
        self.image_size = None if image_size is None else tuple(int(s) for s in image_size)
        self.num_input_views, self.num_target_views = num_input_views, num_target_views
        self.eval_target_views = eval_target_views
        self.held_out_views = list(held_out_views or [])
        self.normalize_poses = normalize_poses

    def dataset(self, shards, train: bool, **reader_kwargs):
        return scene_dataset(shards, train=train, transform_generator=True, **reader_kwargs)

    def sample_transform(self, train: bool):
        if train:
            targets = self.num_target_views
        elif self.eval_target_views is not None:
            targets = self.eval_target_views
        else:  # all held-out views, or as many targets as in training
            targets = None if self.held_out_views else self.num_target_views
        return functools.partial(
            nvs_sample,
            train=train,
            num_input_views=self.num_input_views,
            num_target_views=targets,
            image_size=self.image_size,
            held_out_views=tuple(self.held_out_views),
            normalize_poses=self.normalize_poses,
        )

    def predict_dataloader(self):
        shards = self.predict_shards if self.predict_shards is not None else self.val_shards
        if shards is None:
            raise ValueError(f"{type(self).__name__}: set predict_shards (or val_shards) to predict")
        return val_loader(
            self.dataset(shards, False, **self._reader_kwargs(False)),
            batch_size=self.val_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
