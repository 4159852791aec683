"""NVSDataModule: input/target split per scene, deterministic evaluation views, held-out views, resizing, pose
normalisation, and clear errors for impossible view counts."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from datamodules.nvs import NVSDataModule, select_views
from datamodules.readers import iter_scenes
from datamodules.scenes import generate_scene
from datamodules.writers import SceneWriter
from lact.geometry import camera_centers


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Six procedural scenes of 6 views at 16x16 in two shards."""
    out = tmp_path_factory.mktemp("nvs_scenes")
    with SceneWriter(str(out), samples_per_shard=3) as writer:
        for i in range(6):
            scene = generate_scene([7, i], num_views=6, height=16, width=16)
            writer.write(f"scene{i}", scene["images"], scene["intrinsics"], scene["w2c"])
    return str(out)


def raw_scenes(shards) -> dict:
    return {s["key"]: s for s in iter_scenes(shards)}


def first_batch(loader) -> dict:
    return next(iter(loader))


def test_training_batches_split_each_scene_into_disjoint_inputs_and_targets(shards):
    dm = NVSDataModule(shards, num_input_views=3, num_target_views=2, batch_size=4, batches_per_epoch=2)
    scenes = raw_scenes(shards)
    batch = first_batch(dm.train_dataloader())
    assert batch["input_images"].shape == (4, 3, 3, 16, 16) and batch["target_images"].shape == (
        4,
        2,
        3,
        16,
        16,
    )
    assert batch["input_images"].dtype == torch.float32 and 0 <= batch["input_images"].min() <= 1
    for i, key in enumerate(batch["key"]):
        inputs, targets = batch["input_views"][i], batch["target_views"][i]
        assert not set(inputs.tolist()) & set(targets.tolist())
        raw = scenes[key]
        for name, views in (("input", inputs), ("target", targets)):
            expected = raw["images"][views].permute(0, 3, 1, 2).float() / 255
            torch.testing.assert_close(batch[f"{name}_images"][i], expected)
            torch.testing.assert_close(batch[f"{name}_w2c"][i], raw["w2c"][views])
            torch.testing.assert_close(batch[f"{name}_intrinsics"][i], raw["intrinsics"][views])


class StepTrainer:
    """What the data layer reads of a trainer: the global step that seeds a training pass."""

    def __init__(self, global_step: int):
        self.global_step = global_step


def training_views(shards, global_step: int, **kwargs) -> list[tuple[str, list[int], list[int]]]:
    """(key, input views, target views) of every sample of one training pass of a fresh NVSDataModule
    attached to a trainer at `global_step` (a resumed run's datamodule is just as fresh)."""
    options = dict(num_input_views=2, num_target_views=1, batch_size=4, batches_per_epoch=3)
    dm = NVSDataModule(shards, **{**options, **kwargs})
    dm.trainer = StepTrainer(global_step)
    return [
        (key, inputs.tolist(), targets.tolist())
        for batch in dm.train_dataloader()
        for key, inputs, targets in zip(
            batch["key"], batch["input_views"], batch["target_views"], strict=True
        )
    ]


def test_training_views_repeat_for_the_same_epoch_and_change_with_the_epoch(shards):
    first = training_views(shards, 40)
    torch.manual_seed(123)  # another global RNG state: the views must not depend on it
    torch.rand(1000)
    assert training_views(shards, 40) == first  # a run resumed at step 40 draws the same scenes and views
    assert training_views(shards, 40, seed=1) != first
    later = training_views(shards, 41)
    views = {key: (inputs, targets) for key, inputs, targets in first}
    later_views = {key: (inputs, targets) for key, inputs, targets in later}
    common = views.keys() & later_views.keys()
    assert common and any(views[key] != later_views[key] for key in common)


def test_repeated_visits_of_a_scene_within_an_epoch_draw_new_views(shards):
    # 18 samples from 6 scenes in one pass (as with gso_toy's single scene): each scene is met several
    # times, once per cycle over the shards, and must not get the same views every time.
    visits = defaultdict(list)
    for key, inputs, targets in training_views(shards, 0, batch_size=6, shuffle_buffer=0):
        visits[key].append((inputs, targets))
    repeated = [splits for splits in visits.values() if len(splits) > 1]
    assert repeated and all(len(set(map(str, splits))) > 1 for splits in repeated)


def test_validation_views_are_deterministic_per_scene(shards):
    dm = NVSDataModule(val_shards=shards, num_input_views=2, num_target_views=3, val_batch_size=6)
    first, second = first_batch(dm.val_dataloader()), first_batch(dm.val_dataloader())
    assert first["key"] == second["key"] and len(first["key"]) == 6
    assert torch.equal(first["input_views"], second["input_views"])
    assert torch.equal(first["target_images"], second["target_images"])
    assert len({tuple(v.tolist()) for v in first["input_views"]}) > 1  # not the same views for every scene
    predict = first_batch(dm.predict_dataloader())  # falls back to val_shards, same selection
    assert torch.equal(predict["target_views"], first["target_views"])


def test_held_out_views_are_never_trained_on_and_are_the_evaluation_targets(shards):
    dm = NVSDataModule(
        shards,
        shards,
        num_input_views=2,
        num_target_views=2,
        held_out_views=[1, 4],
        batch_size=6,
        batches_per_epoch=4,
    )
    seen = set()
    for batch in dm.train_dataloader():
        seen |= set(batch["input_views"].flatten().tolist()) | set(batch["target_views"].flatten().tolist())
    assert seen and not seen & {1, 4}
    val = first_batch(dm.val_dataloader())
    assert val["target_views"].tolist() == [[1, 4]] * 6
    assert not set(val["input_views"].flatten().tolist()) & {1, 4}


def test_resizing_scales_images_and_intrinsics(shards):
    dm = NVSDataModule(val_shards=shards, image_size=8, num_input_views=1, num_target_views=1)
    batch = first_batch(dm.val_dataloader())
    assert batch["input_images"].shape[-2:] == (8, 8)
    raw = raw_scenes(shards)[batch["key"][0]]
    view = batch["input_views"][0, 0]
    torch.testing.assert_close(batch["input_intrinsics"][0, 0], raw["intrinsics"][view] / 2)
    # Downscaling by 2 with antialiasing averages 2x2 blocks.
    blocks = (raw["images"][view].permute(2, 0, 1).float() / 255).reshape(3, 8, 2, 8, 2).mean(dim=(2, 4))
    torch.testing.assert_close(batch["input_images"][0, 0], blocks, atol=1e-5, rtol=0)


def test_pose_normalisation_uses_the_input_views(shards):
    dm = NVSDataModule(val_shards=shards, num_input_views=3, num_target_views=2, normalize_poses=True)
    batch = first_batch(dm.val_dataloader())
    centres = camera_centers(batch["input_w2c"])  # [B, 3, 3]
    torch.testing.assert_close(centres.mean(dim=1), torch.zeros(len(centres), 3), atol=1e-5, rtol=0)
    assert centres.norm(dim=-1).amax(dim=1).sub(1).abs().max() < 1e-5
    torch.testing.assert_close(
        batch["input_w2c"][:, 0, :3, :3], torch.eye(3).expand(len(centres), 3, 3), atol=1e-5, rtol=0
    )


def test_view_count_errors(shards):
    with pytest.raises(ValueError, match="num_input_views must be >= 1"):
        NVSDataModule(shards, num_input_views=0)
    with pytest.raises(ValueError, match="num_target_views must be >= 1"):
        NVSDataModule(shards, num_target_views=0)
    dm = NVSDataModule(
        shards, shards, num_input_views=4, num_target_views=3, batch_size=2, batches_per_epoch=1
    )
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        with pytest.raises(
            ValueError, match=r"scene 'scene\d' \(shard .*\.tar\) holds 6 views, fewer than .* 4 \+ 3"
        ):
            first_batch(loader)
    with pytest.raises(ValueError, match="outside held_out_views"):
        select_views(6, 4, 1, None, held_out=[0, 1], scene="s")
    with pytest.raises(ValueError, match=r"held_out_views \[9\]"):
        select_views(6, 1, 1, None, held_out=[9], scene="s")


@pytest.fixture(scope="module")
def easy_shards(tmp_path_factory):
    """Three one-primitive scenes (keys easy*), the first stage of a curriculum."""
    out = tmp_path_factory.mktemp("nvs_easy")
    with SceneWriter(str(out), samples_per_shard=3) as writer:
        for i in range(3):
            scene = generate_scene([8, i], num_views=6, height=16, width=16, num_primitives=(1, 1))
            writer.write(f"easy{i}", scene["images"], scene["intrinsics"], scene["w2c"])
    return str(out)


def pass_keys(loader) -> set[str]:
    return {key for batch in loader for key in batch["key"]}


def test_curriculum_reads_each_stage_by_the_step_a_pass_starts_at_also_when_resumed(shards, easy_shards):
    curriculum = [{"shards": easy_shards, "until_step": 6}]
    options = dict(num_input_views=2, num_target_views=1, batch_size=2, batches_per_epoch=3)

    def loader(step: int):
        dm = NVSDataModule(shards, curriculum=curriculum, **options)
        dm.trainer = StepTrainer(step)
        return dm.train_dataloader()

    easy, full = {f"easy{i}" for i in range(3)}, {f"scene{i}" for i in range(6)}
    assert pass_keys(loader(0)) <= easy and pass_keys(loader(3)) <= easy
    assert pass_keys(loader(6)) <= full and pass_keys(loader(9)) <= full
    # The same stream as without a curriculum once past it: the stage reader is the plain one.
    assert training_views(shards, 9, batch_size=2) == training_views(
        shards, 9, batch_size=2, curriculum=curriculum
    )
    # A run stopped one batch into the pass that started at step 3 resumes at step 4 in that pass, after
    # the stage's end: it replays the pass from its seed, so it still reads the first stage.
    uninterrupted = [batch["key"] for batch in loader(3)]
    resumed = loader(7)
    resumed.load_state_dict({"pass_seed": 3, "batches": 1})
    assert [batch["key"] for batch in resumed] == uninterrupted[1:]


def test_curriculum_stage_can_end_at_a_fraction_of_max_steps(shards, easy_shards):
    dm = NVSDataModule(
        shards,
        curriculum=[{"shards": easy_shards, "until_fraction": 0.25}],
        num_input_views=2,
        num_target_views=1,
        batch_size=2,
        batches_per_epoch=3,
    )
    dm.trainer = StepTrainer(5)
    dm.trainer.max_steps = 24  # the stage ends at step 6
    assert pass_keys(dm.train_dataloader()) <= {f"easy{i}" for i in range(3)}
    dm.trainer = StepTrainer(6)
    dm.trainer.max_steps = 24
    assert pass_keys(dm.train_dataloader()) <= {f"scene{i}" for i in range(6)}
    dm.trainer.max_steps = -1  # Lightning's "no limit"
    with pytest.raises(ValueError, match=r"curriculum\[0\]\.until_fraction needs trainer.max_steps >= 1"):
        dm.train_dataloader()


def test_curriculum_errors_name_the_stage(shards, easy_shards):
    stages = [{"shards": easy_shards, "until_step": 6}, {"shards": easy_shards, "until_step": 6}]
    dm = NVSDataModule(shards, curriculum=stages)
    dm.trainer = StepTrainer(0)
    with pytest.raises(ValueError, match=r"curriculum\[1\] ends at step 6, not after the stage before it"):
        dm.train_dataloader()
    with pytest.raises(
        ValueError, match=r"curriculum\[0\] must be a mapping with the keys shards and until_step"
    ):
        NVSDataModule(shards, curriculum=[{"shards": easy_shards, "steps": 6}])
    with pytest.raises(ValueError, match=r"curriculum\[0\]\.until_fraction must be a number in \(0, 1\)"):
        NVSDataModule(shards, curriculum=[{"shards": easy_shards, "until_fraction": 1.5}])
