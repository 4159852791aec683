"""Camera geometry: rays through pixel centres, Plücker channels, patches, orbit and normalised cameras."""

from __future__ import annotations

import math

import pytest
import torch

from lact.geometry import (
    camera_centers,
    camera_rays,
    camera_to_world,
    look_at,
    normalize_cameras,
    orbit_cameras,
    patchify,
    plucker_rays,
    scale_intrinsics,
    unpatchify,
    up_axis,
)

Z_UP = torch.tensor([0.0, 0.0, 1.0])


def sphere_eyes(count: int, radius: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    azimuth = torch.rand(count, generator=g) * 2 * math.pi
    elevation = (torch.rand(count, generator=g) - 0.5) * 2.0  # within +-57 degrees: never along up
    return radius * torch.stack(
        [elevation.cos() * azimuth.cos(), elevation.cos() * azimuth.sin(), elevation.sin()], dim=-1
    )


def test_ray_through_principal_point_passes_through_the_origin():
    # 33 x 33 pixels with the principal point at 16.5: exactly the centre of pixel (16, 16).
    for radius in (0.5, 2.7, 10.0):
        eyes = sphere_eyes(8, radius)
        w2c = look_at(eyes, torch.zeros_like(eyes), Z_UP.expand_as(eyes))
        intrinsics = torch.tensor([40.0, 45.0, 16.5, 16.5]).expand(8, 4)
        origins, directions = camera_rays(intrinsics, w2c, 33, 33)
        o, d = origins[:, 16, 16], directions[:, 16, 16]
        distance = torch.linalg.cross(o, d, dim=-1).norm(dim=-1)  # |o x d| = distance of the line to 0
        assert distance.max() < 1e-5, distance
        assert ((o + radius * d).norm(dim=-1)).max() < 1e-5  # and reaches it after exactly r units
        torch.testing.assert_close(o, eyes)


def test_pixel_centres_are_at_half_pixels():
    w2c = torch.eye(4)  # camera at the origin looking down +z
    fx, fy, cx, cy = 10.0, 20.0, 3.0, 2.0
    _, directions = camera_rays(torch.tensor([fx, fy, cx, cy]), w2c, 4, 6)
    expected = torch.tensor([(0.5 - cx) / fx, (0.5 - cy) / fy, 1.0])  # pixel (row 0, col 0)
    torch.testing.assert_close(directions[0, 0], expected / expected.norm())
    expected = torch.tensor([(5.5 - cx) / fx, (3.5 - cy) / fy, 1.0])  # pixel (row 3, col 5)
    torch.testing.assert_close(directions[3, 5], expected / expected.norm())


def test_plucker_channels_are_origin_direction_moment():
    eyes = sphere_eyes(3, 2.0)
    w2c = look_at(eyes, torch.zeros_like(eyes), Z_UP.expand_as(eyes))
    intrinsics = torch.tensor([30.0, 30.0, 8.0, 6.0]).expand(3, 4)
    rays = plucker_rays(intrinsics, w2c, 12, 16)
    assert rays.shape == (3, 9, 12, 16)
    origins, directions = camera_rays(intrinsics, w2c, 12, 16)
    torch.testing.assert_close(rays[:, 0:3], origins.movedim(-1, 1))
    torch.testing.assert_close(rays[:, 3:6], directions.movedim(-1, 1))
    torch.testing.assert_close(rays[:, 6:9], torch.linalg.cross(origins, directions, dim=-1).movedim(-1, 1))
    torch.testing.assert_close(rays[:, 3:6].norm(dim=1), torch.ones(3, 12, 16))


def test_rays_keep_the_cameras_precision_under_mixed_precision():
    """Under bf16 autocast (`trainer.precision: bf16-mixed`) the rays are computed exactly as without it: the
    rotation is not run in bf16 and the moment's cross product does not meet mixed dtypes."""
    eyes = sphere_eyes(3, 2.0)
    w2c = look_at(eyes, torch.zeros_like(eyes), Z_UP.expand_as(eyes))
    intrinsics = torch.tensor([30.0, 30.0, 8.0, 6.0]).expand(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = plucker_rays(intrinsics, w2c, 12, 16)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plucker_rays(intrinsics, w2c, 12, 16), rtol=0, atol=0)


def test_camera_to_world_inverts_and_centres_match():
    eyes = sphere_eyes(5, 3.0)
    w2c = look_at(eyes, torch.zeros_like(eyes), Z_UP.expand_as(eyes))
    torch.testing.assert_close(camera_to_world(w2c) @ w2c, torch.eye(4).expand(5, 4, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(camera_centers(w2c), eyes)


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 5, 8, 12)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 3, 6, 5 * 16)
    assert torch.equal(unpatchify(tokens, 4, 8, 12), x)
    # Patches row by row; each patch laid out (C, row, col).
    assert torch.equal(tokens[1, 2, 2].reshape(5, 4, 4), x[1, 2, :, 0:4, 8:12])
    assert torch.equal(tokens[1, 2, 3].reshape(5, 4, 4), x[1, 2, :, 4:8, 0:4])
    with pytest.raises(ValueError, match="divisible by patch_size=4"):
        patchify(torch.randn(3, 10, 8), 4)
    with pytest.raises(ValueError, match="do not tile"):
        unpatchify(tokens, 4, 8, 8)


def test_orbit_circles_the_up_axis_looking_at_the_origin():
    eyes = torch.tensor([[2.0, 0.5, 1.0], [0.0, 2.0, 1.2], [-1.5, -1.0, 0.8]])
    w2c = look_at(eyes, torch.zeros_like(eyes), Z_UP.expand_as(eyes))
    torch.testing.assert_close(up_axis(w2c), Z_UP)
    orbit = orbit_cameras(w2c, 12)
    centres = camera_centers(orbit)
    torch.testing.assert_close(centres[:, 2], torch.full((12,), 1.0), atol=1e-5, rtol=0)  # mean height
    torch.testing.assert_close(centres.norm(dim=-1), torch.full((12,), eyes.norm(dim=-1).mean().item()))
    forward = camera_to_world(orbit)[:, :3, 2]  # optical axes point at the origin
    torch.testing.assert_close(forward, -centres / centres.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)
    assert torch.atan2(centres[0, 1], centres[0, 0]).item() == pytest.approx(math.atan2(0.5, 2.0), abs=1e-5)


def test_normalize_cameras_keeps_relative_poses_and_rescales():
    eyes = sphere_eyes(6, 5.0) + torch.tensor([10.0, -3.0, 2.0])
    w2c = look_at(eyes, torch.zeros_like(eyes), Z_UP.expand_as(eyes))
    out = normalize_cameras(w2c, w2c[:4])
    centres = camera_centers(out)
    torch.testing.assert_close(centres[:4].mean(dim=0), torch.zeros(3), atol=1e-5, rtol=0)
    assert centres[:4].norm(dim=-1).max().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(out[0, :3, :3], torch.eye(3), atol=1e-5, rtol=0)  # first reference's axes
    # Relative rotations are unchanged; relative positions only scaled.
    rel_before = w2c[1, :3, :3] @ w2c[5, :3, :3].mT
    torch.testing.assert_close(out[1, :3, :3] @ out[5, :3, :3].mT, rel_before, atol=1e-5, rtol=0)


def test_scaled_intrinsics_give_the_rays_of_the_resized_image():
    # Halving a 8x8 image: small pixel (i, j) covers big pixels 2i..2i+1, so its centre is the big image's
    # point (2j + 1, 2i + 1).
    w2c = torch.eye(4)
    big = torch.tensor([20.0, 22.0, 3.7, 4.1])
    small = scale_intrinsics(big, 0.5, 0.5)
    _, d_small = camera_rays(small, w2c, 4, 4)
    i, j = 1, 2
    expected = torch.tensor([(2 * j + 1 - big[2]) / big[0], (2 * i + 1 - big[3]) / big[1], 1.0])
    torch.testing.assert_close(d_small[i, j], expected / expected.norm())
