"""The generic shard DataModules inside a real Lightning fit: batch counts, epochs, validation coverage."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from datamodules.base import SceneShardDataModule, ShardDataModule, TokenShardDataModule, VideoShardDataModule

from .conftest import write_scenes, write_token_shards, write_video_shards


class KeyRecorder(LightningModule):
    """Fits a single weight to the mean pixel; remembers which sample keys it saw, per epoch."""

    def __init__(self, field: str):
        super().__init__()
        self.field = field
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_keys: dict[int, list[str]] = {}
        self.val_keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.train_keys.setdefault(self.current_epoch, []).extend(batch["key"])
        return (self.weight - batch[self.field].float().mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_keys.extend(batch["key"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: ShardDataModule, field: str, epochs: int = 2) -> KeyRecorder:
    model = KeyRecorder(field)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=module)
    return model


def test_scene_datamodule_in_a_fit(tmp_path):
    scenes = write_scenes(tmp_path / "train", 8, 3)
    val = write_scenes(tmp_path / "val", 5, 2, seed=1)
    module = SceneShardDataModule(
        str(tmp_path / "train"),
        str(tmp_path / "val"),
        batch_size=2,
        num_workers=2,
        batches_per_epoch=4,
        num_views=3,
    )
    model = fit(module, "images")
    assert [len(model.train_keys[e]) for e in (0, 1)] == [8, 8]  # 4 full batches of 2 per epoch
    assert set(model.train_keys[0]) <= set(scenes)
    assert model.train_keys[0] != model.train_keys[1], "each epoch draws a fresh stream"
    assert sorted(model.val_keys) == sorted(list(val) * 2)  # every validation scene once per epoch
    again = fit(
        SceneShardDataModule(str(tmp_path / "train"), batch_size=2, num_workers=2, batches_per_epoch=4),
        "images",
    )
    assert again.train_keys == model.train_keys, "same seed and steps, same batches (what a resume relies on)"


def add_offset(sample: dict, offset: int) -> dict:
    return {**sample, "tokens": sample["tokens"] + offset}


class ShiftedTokens(TokenShardDataModule):
    def sample_transform(self, train):
        return functools.partial(add_offset, offset=1000)


def test_token_datamodule_with_a_transform_and_no_validation(tmp_path):
    write_token_shards(tmp_path, 6, 2, length=9)
    module = ShiftedTokens(str(tmp_path), batch_size=3, num_workers=0, batches_per_epoch=2, seq_len=8)
    batch = next(iter(module.train_dataloader()))
    assert batch["tokens"].shape == (3, 9) and batch["tokens"].min() >= 1000
    assert module.val_dataloader() == []
    model = fit(module, "tokens", epochs=1)
    assert len(model.train_keys[0]) == 6 and model.val_keys == []


def test_video_datamodule_checks_shapes(tmp_path):
    write_video_shards(tmp_path, 4, 2, shape=(3, 4, 5, 3))
    module = VideoShardDataModule(val_shards=str(tmp_path), batch_size=4, num_workers=0, shape=(3, 4, 5, 3))
    (batch,) = list(module.val_dataloader())
    assert batch["frames"].shape == (4, 3, 4, 5, 3) and len(batch["caption"]) == 4
    strict = VideoShardDataModule(
        val_shards=str(tmp_path), num_workers=0, shape=(8, None, None, 3), max_bad_samples=0
    )
    with pytest.raises(
        Exception, match=r"frames.npy has shape \[3, 4, 5, 3\], expected \[8, None, None, 3\]"
    ):
        list(strict.val_dataloader())
    with pytest.raises(ValueError, match="train_shards is not set"):
        strict.train_dataloader()


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_training_loader_resumed_mid_pass_yields_the_remaining_batches_exactly(scene_shards, workers):
    from datamodules.nvs import NVSDataModule

    folder, _ = scene_shards

    def loader():
        data = NVSDataModule(
            train_shards=str(folder), num_input_views=2, num_target_views=1, batch_size=2,
            batches_per_epoch=7, num_workers=workers, shuffle_buffer=4,
        )  # fmt: skip
        return data.train_dataloader()

    def views(batches):  # which scenes, and which of their views the per-visit generators drew
        return [(b["key"], b["input_views"].tolist(), b["target_views"].tolist()) for b in batches]

    full = views(loader())
    first = loader()
    stream = iter(first)
    head = [next(stream) for _ in range(3)]
    state = first.state_dict()
    assert state == {"pass_seed": 0, "batches": 3} and views(head) == full[:3]
    resumed = loader()
    resumed.load_state_dict(state)
    assert views(resumed) == full[3:]  # batch 3 first: the workers' round-robin is rotated, not restarted
