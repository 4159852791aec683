"""The camera-JSON importer: a synthetic folder (always) and the real renders in ../shared/data/gso_toy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules import prepare
from datamodules.camera_json import find_camera_json_scenes, load_camera_json_scene, scene_key
from datamodules.cameras import camera_centers, pixel_rays, project
from datamodules.readers import iter_scenes
from datamodules.scenes import generate_scene

GSO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gso_toy"
needs_gso = pytest.mark.skipif(not (GSO / "opencv_cameras.json").is_file(), reason=f"{GSO} is absent")


def write_camera_folder(folder: Path, views: int = 4) -> dict:
    """A procedural scene saved as RGBA renderings (background transparent) + opencv_cameras.json."""
    scene = generate_scene(5, num_views=views, height=20, width=30)
    (folder / "renderings").mkdir(parents=True)
    frames = []
    for i, image in enumerate(scene["images"]):
        alpha = np.where((image == 255).all(-1), 0, 255).astype(np.uint8)
        rgba = np.concatenate(
            [np.where(alpha[..., None] == 0, 0, image), alpha[..., None]], -1
        )  # black under alpha 0
        rgba[0, 0] = (0, 0, 0, 128)  # one half-transparent black pixel: composites to 127
        Image.fromarray(rgba).save(folder / "renderings" / f"{i:08d}_rgba.png")
        fx, fy, cx, cy = (float(v) for v in scene["intrinsics"][i])
        w2c = scene["w2c"][i].tolist()
        frames.append(
            {
                "w": 30,
                "h": 20,
                "fx": fx,
                "fy": fy,
                "cx": cx,
                "cy": cy,
                "w2c": w2c,
                "file_path": f"renderings/{i:08d}_rgba.png",
            }
        )
    (folder / "opencv_cameras.json").write_text(json.dumps(frames))
    return scene


def test_import_composites_on_white_and_keeps_cameras_exactly(tmp_path):
    scene = write_camera_folder(tmp_path / "obj")
    imported = load_camera_json_scene(str(tmp_path / "obj"))
    want = scene["images"].copy()
    want[:, 0, 0] = 127
    assert np.array_equal(imported["images"], want)
    assert np.array_equal(imported["intrinsics"], scene["intrinsics"])
    assert np.array_equal(imported["w2c"], scene["w2c"])


def test_import_finds_scene_folders_and_names_them(tmp_path):
    write_camera_folder(tmp_path / "root" / "a.obj", views=2)
    write_camera_folder(tmp_path / "root" / "b", views=2)
    folders = find_camera_json_scenes(str(tmp_path / "root"))
    assert [scene_key(f, str(tmp_path / "root")) for f in folders] == ["a_obj", "b"]
    assert find_camera_json_scenes(str(tmp_path / "root" / "b")) == [str(tmp_path / "root" / "b")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no opencv_cameras.json in"):
        find_camera_json_scenes(str(tmp_path / "empty"))


def test_import_reports_a_bad_frame(tmp_path):
    write_camera_folder(tmp_path / "obj", views=2)
    frames = json.loads((tmp_path / "obj" / "opencv_cameras.json").read_text())
    del frames[1]["fx"]
    (tmp_path / "obj" / "opencv_cameras.json").write_text(json.dumps(frames))
    with pytest.raises(ValueError, match=r"opencv_cameras.json: frame 1 lacks \['fx'\]"):
        load_camera_json_scene(str(tmp_path / "obj"))


@pytest.fixture(scope="module")
def gso():
    return json.loads((GSO / "opencv_cameras.json").read_text()), load_camera_json_scene(str(GSO))


@needs_gso
def test_gso_cameras_sit_at_the_implied_distance_and_look_at_the_object(gso):
    frames, scene = gso
    w2c = scene["w2c"].astype(np.float64)
    distance = np.linalg.norm(np.array([f["w2c"] for f in frames])[:, :3, 3], axis=1)  # |t| = |centre|
    centres = camera_centers(w2c)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), distance, rtol=1e-6)
    np.testing.assert_allclose(distance, 2.7, rtol=1e-6)
    forward = w2c[:, 2, :3]  # the camera's +z axis in world coordinates
    towards_origin = -centres / np.linalg.norm(centres, axis=1, keepdims=True)
    assert (np.einsum("vi,vi->v", forward, towards_origin) > 0.9999).all()


@needs_gso
def test_gso_ray_through_the_image_centre_passes_near_the_origin(gso):
    _, scene = gso
    views, height, width = scene["images"].shape[:3]
    # The rays of the four pixels around the image centre (rows and columns 255, 256): shifting the
    # principal point by 255 makes them pixels 0 and 1 of a 2x2 image.
    intrinsics = scene["intrinsics"].astype(np.float64) - [0, 0, width // 2 - 1, height // 2 - 1]
    origins, dirs = pixel_rays(intrinsics, scene["w2c"], 2, 2)
    centre_dirs = dirs.reshape(views, 4, 3)
    along = np.einsum("vki,vi->vk", centre_dirs, -origins)
    closest = origins[:, None] + along[..., None] * centre_dirs  # closest point to the origin on each ray
    assert np.linalg.norm(closest, axis=-1).max() < 0.01  # within 1 cm of a 2.7 m orbit


@needs_gso
def test_gso_object_is_where_the_cameras_say(gso):
    _, scene = gso
    images = scene["images"]
    mask = (images < 250).any(-1)
    assert (images[:, :4, :4] == 255).all(), "RGBA background composited on white"
    uv, _ = project(np.zeros((1, 3)), scene["intrinsics"], scene["w2c"])
    rows, cols = uv[:, 0, 1].astype(int), uv[:, 0, 0].astype(int)
    assert mask[np.arange(len(mask)), rows, cols].all(), "the origin lies inside the object in every view"
    for v in range(len(mask)):
        centroid = np.argwhere(mask[v]).mean(0)
        assert np.abs(centroid - [256, 256]).max() < 0.1 * 512


@needs_gso
def test_gso_resize_crop_and_shard_round_trip(tmp_path, gso):
    _, full = gso
    args = ["scenes", "--out", str(tmp_path), "--from-json", str(GSO), "--height", "48", "--width", "64"]
    meta = prepare.main(args)
    assert meta["samples"] == 1 and meta["shards"] == ["shard-000000.tar"]
    (sample,) = iter_scenes(tmp_path, num_views=64, image_size=(48, 64))
    assert sample["key"] == "gso_toy"
    intr = sample["intrinsics"].numpy()
    np.testing.assert_allclose(intr[0], [548.9937684857528 / 8, 548.9937684857528 / 8, 32, 24], rtol=1e-6)
    np.testing.assert_array_equal(sample["w2c"].numpy(), full["w2c"])
    # The projections scale with the image (512 -> 64) and shift by the crop (8 rows off the top).
    points = np.random.default_rng(0).uniform(-0.2, 0.2, (10, 3))
    before, _ = project(points, full["intrinsics"], full["w2c"])
    after, _ = project(points, intr, full["w2c"])
    np.testing.assert_allclose(after, before / 8 - [0, 8], atol=1e-3)
    mask = (sample["images"].numpy() < 250).any(-1)
    origin, _ = project(np.zeros((1, 3)), intr, full["w2c"])
    assert mask[np.arange(64), origin[:, 0, 1].astype(int), origin[:, 0, 0].astype(int)].all()
