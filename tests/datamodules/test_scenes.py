"""Procedural scenes and camera helpers: conventions, exact agreement of pixels and cameras, speed."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.cameras import camera_centers, cover_crop, look_at_w2c, pixel_rays, project
from datamodules.scenes import Primitive, generate_scene, render


def test_look_at_follows_the_opencv_convention():
    w2c = look_at_w2c(np.array([[3.0, 0.0, 0.0]]))[0]
    # From +x looking at the origin with z up: camera x (right) is world +y, y (down) is world -z.
    np.testing.assert_allclose(w2c[:3, :3], [[0, 1, 0], [0, 0, -1], [-1, 0, 0]], atol=1e-12)
    np.testing.assert_allclose(camera_centers(w2c[None]), [[3, 0, 0]], atol=1e-12)
    uv, depth = project(np.array([[0, 0, 0], [0, 0, 0.5]]), np.array([[100, 100, 32, 24]]), w2c[None])
    assert depth[0, 0] == pytest.approx(3)
    np.testing.assert_allclose(uv[0, 0], [32, 24])  # the target projects to the principal point
    assert uv[0, 1, 1] < 24  # a point above the target appears higher in the image (smaller v)


def test_pixel_rays_pass_through_the_pixels_they_belong_to():
    rng = np.random.default_rng(0)
    w2c = look_at_w2c(rng.normal(size=(3, 3)) * 3)
    intrinsics = np.array([[50, 60, 16.3, 11.7]] * 3)
    origins, dirs = pixel_rays(intrinsics, w2c, 24, 32)
    points = origins[:, None, None] + 2.0 * dirs  # one point on each ray
    for v in range(3):
        uv, _ = project(points[v].reshape(-1, 3), intrinsics[v : v + 1], w2c[v : v + 1])
        cols, rows = np.meshgrid(np.arange(32) + 0.5, np.arange(24) + 0.5)  # pixel centres at +0.5
        np.testing.assert_allclose(uv[0].reshape(24, 32, 2), np.stack([cols, rows], -1), atol=1e-9)


def test_cover_crop_keeps_projections_consistent():
    intr = np.array([500.0, 500.0, 256.0, 256.0])
    new, resized, box = cover_crop(intr, (512, 512), (48, 64))
    assert resized == (64, 64) and box == (0, 8, 64, 56)
    w2c = look_at_w2c(np.array([[0.0, -2.5, 1.0]]))
    points = np.random.default_rng(1).uniform(-0.5, 0.5, (20, 3))
    before, _ = project(points, intr[None], w2c)
    after, _ = project(points, new[None], w2c)
    np.testing.assert_allclose(after, before * 64 / 512 - [0, 8], atol=1e-9)


def test_scenes_are_deterministic_and_seed_dependent():
    a, b, c = generate_scene(7, num_views=4), generate_scene(7, num_views=4), generate_scene(8, num_views=4)
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["w2c"], b["w2c"])
    assert not np.array_equal(a["images"], c["images"])


def test_scene_shapes_dtypes_and_cameras():
    scene = generate_scene(0, num_views=5, height=24, width=40)
    assert scene["images"].shape == (5, 24, 40, 3) and scene["images"].dtype == np.uint8
    assert scene["intrinsics"].shape == (5, 4) and scene["intrinsics"].dtype == np.float32
    assert scene["w2c"].shape == (5, 4, 4) and scene["w2c"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(camera_centers(scene["w2c"]), axis=1), 2.7, rtol=1e-5)


@pytest.mark.parametrize("height,width", [(32, 32), (24, 40), (40, 24)])
def test_object_is_visible_and_never_leaves_the_frame(height, width):
    for seed in range(10):
        background = (generate_scene(seed, num_views=8, height=height, width=width)["images"] == 255).all(-1)
        assert ((~background).mean(axis=(1, 2)) > 0.02).all(), "the object is visible in every view"
        border = np.concatenate(
            [background[:, 0], background[:, -1], background[:, :, 0], background[:, :, -1]], 1
        )
        assert border.all(), f"seed {seed}: the object touches the image border"


def test_rendered_sphere_sits_where_the_cameras_project_it():
    sphere = Primitive(
        "sphere", np.array([0.2, -0.1, 0.3]), np.eye(3), np.array([0.4] * 3), np.array([1.0, 0, 0]), 0.0
    )
    scene = generate_scene(3, num_views=6, height=96, width=96)  # only for its cameras
    images = render([sphere], scene["intrinsics"], scene["w2c"], 96, 96)
    uv, depth = project(sphere.center[None], scene["intrinsics"], scene["w2c"])
    for v in range(6):
        mask = (images[v] != 255).any(-1)
        rows, cols = np.nonzero(mask)
        # A sphere's outline is an ellipse whose centre is near (not at) the projected centre; compare
        # with the predicted radius in pixels instead: its silhouette area.
        radius_px = scene["intrinsics"][v, 0] * 0.4 / np.sqrt(depth[v, 0] ** 2 - 0.4**2)
        assert mask.sum() == pytest.approx(np.pi * radius_px**2, rel=0.12)
        centroid = np.array([cols.mean() + 0.5, rows.mean() + 0.5])
        assert np.linalg.norm(centroid - uv[v, 0]) < 0.1 * radius_px
        assert mask[int(uv[v, 0, 1]), int(uv[v, 0, 0])]


def test_views_show_different_sides():
    scene = generate_scene(1, num_views=8)
    images = scene["images"].astype(np.int16)
    diffs = [np.abs(images[i] - images[j]).mean() for i in range(8) for j in range(i + 1, 8)]
    assert min(diffs) > 1.0
