"""Camera geometry for novel view synthesis: per-pixel rays, Plücker coordinates, patches, orbit cameras.

Conventions (the OpenCV pinhole camera, as stored in scene shards):
    intrinsics  [..., 4]     (fx, fy, cx, cy) in pixels; pixel (row i, column j) has its centre at
                             (u, v) = (j + 0.5, i + 0.5), so a principal point at (W/2, H/2) is the image centre
    w2c         [..., 4, 4]  world-to-camera; camera axes x right, y down, z forward (the viewing direction)
World units are whatever the scene uses (object scenes: cameras a few units from the origin).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def camera_to_world(w2c: Tensor) -> Tensor:
    """Invert rigid world-to-camera matrices [..., 4, 4] exactly: c2w = [R^T, -R^T t; 0, 1]."""
    rot_t = w2c[..., :3, :3].mT
    c2w = torch.zeros_like(w2c)
    c2w[..., :3, :3] = rot_t
    c2w[..., :3, 3] = -(rot_t @ w2c[..., :3, 3:]).squeeze(-1)
    c2w[..., 3, 3] = 1
    return c2w


def camera_centers(w2c: Tensor) -> Tensor:
    """Camera positions in world coordinates: w2c [..., 4, 4] -> [..., 3]."""
    return camera_to_world(w2c)[..., :3, 3]


def camera_rays(intrinsics: Tensor, w2c: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Rays through every pixel centre.

    intrinsics [..., 4], w2c [..., 4, 4] -> (origins [..., H, W, 3], unit directions [..., H, W, 3]) in world
    coordinates; every pixel of a view shares its camera's origin.
    """
    if intrinsics.shape[-1] != 4:
        raise ValueError(f"intrinsics must be [..., 4] (fx, fy, cx, cy), got {tuple(intrinsics.shape)}")
    if w2c.shape[-2:] != (4, 4) or w2c.shape[:-2] != intrinsics.shape[:-1]:
        raise ValueError(
            f"w2c must be [..., 4, 4] with the batch shape of intrinsics {tuple(intrinsics.shape[:-1])}, "
            f"got {tuple(w2c.shape)}"
        )
    with torch.autocast(w2c.device.type, enabled=False):
        # Rays in the cameras' dtype even under mixed precision: autocast would run the rotation in bf16
        # (directions off by ~1e-2) and hand the moment's cross product mixed dtypes.
        return _camera_rays(intrinsics, w2c, height, width)


def _camera_rays(intrinsics: Tensor, w2c: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    dtype, device = w2c.dtype, w2c.device
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device) + 0.5,
        torch.arange(width, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )  # [H, W] each, pixel centres
    fx, fy, cx, cy = (intrinsics[..., i, None, None].to(dtype) for i in range(4))  # [..., 1, 1]
    dirs_cam = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u - cx)], dim=-1)  # [..., H, W, 3]
    c2w = camera_to_world(w2c)
    rot = c2w[..., None, None, :3, :3]  # [..., 1, 1, 3, 3]
    directions = F.normalize((rot @ dirs_cam.unsqueeze(-1)).squeeze(-1), dim=-1)
    origins = c2w[..., None, None, :3, 3].expand_as(directions)
    return origins, directions


def plucker_rays(intrinsics: Tensor, w2c: Tensor, height: int, width: int) -> Tensor:
    """The 9 ray channels of every pixel: origin o, unit direction d and moment o x d.

    intrinsics [..., 4], w2c [..., 4, 4] -> [..., 9, H, W] (channels first, ready for patchify).
    """
    origins, directions = camera_rays(intrinsics, w2c, height, width)
    rays = torch.cat([origins, directions, torch.linalg.cross(origins, directions, dim=-1)], dim=-1)
    return rays.movedim(-1, -3)


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping p x p patches: [..., C, H, W] -> [..., (H/p)*(W/p), C*p*p].

    Patches are ordered row by row; each patch vector is laid out (C, p_row, p_col).
    """
    *lead, channels, height, width = x.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} must be divisible by patch_size={p}")
    n = len(lead)
    x = x.reshape(*lead, channels, height // p, p, width // p, p)
    x = x.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)  # [..., H/p, W/p, C, p, p]
    return x.reshape(*lead, (height // p) * (width // p), channels * p * p)


def unpatchify(tokens: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """Inverse of `patchify`: [..., (H/p)*(W/p), C*p*p] -> [..., C, H, W]."""
    *lead, count, features = tokens.shape
    p = patch_size
    rows, cols = height // p, width // p
    if height % p or width % p or count != rows * cols or features % (p * p):
        raise ValueError(
            f"tokens {tuple(tokens.shape)} do not tile a {height}x{width} image with patch_size={p} "
            f"(expected [..., {rows * cols}, C*{p * p}])"
        )
    channels = features // (p * p)
    n = len(lead)
    x = tokens.reshape(*lead, rows, cols, channels, p, p)
    x = x.permute(*range(n), n + 2, n, n + 3, n + 1, n + 4)  # [..., C, H/p, p, W/p, p]
    return x.reshape(*lead, channels, height, width)


def look_at(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """OpenCV world-to-camera matrices of cameras at `eye` [..., 3] looking at `target` [..., 3], with the
    image's up (-y) as close to `up` [..., 3] as possible. Returns [..., 4, 4]."""
    forward = F.normalize(target - eye, dim=-1)  # camera z
    right = F.normalize(torch.linalg.cross(forward, up.expand_as(forward), dim=-1), dim=-1)  # camera x
    down = torch.linalg.cross(forward, right, dim=-1)  # camera y
    rot = torch.stack([right, down, forward], dim=-2)  # rows: camera axes in world coordinates
    w2c = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype, device=eye.device)
    w2c[..., :3, :3] = rot
    w2c[..., :3, 3] = -(rot @ eye.unsqueeze(-1)).squeeze(-1)
    w2c[..., 3, 3] = 1
    return w2c


def up_axis(w2c: Tensor) -> Tensor:
    """The world's up direction [3] as seen by cameras w2c [V, 4, 4] without roll (built by `look_at`).

    Such cameras have their x axis (image right) orthogonal to up, so up is the direction least aligned
    with all x axes: the eigenvector of sum_i x_i x_i^T with the smallest eigenvalue, oriented along the
    mean image-up (-y). When the x axes do not pin it down (one camera, or all x axes parallel), the mean
    image-up itself.
    """
    c2w = camera_to_world(w2c).double()
    right, image_up = c2w[:, :3, 0], -c2w[:, :3, 1]  # OpenCV y points down the image
    mean_up = image_up.mean(dim=0)
    values, vectors = torch.linalg.eigh(right.mT @ right)
    if values[0] < 0.25 * values[1]:
        up = vectors[:, 0] * torch.sign(vectors[:, 0] @ mean_up + 1e-12)
    else:
        up = mean_up
    return F.normalize(up, dim=0).to(w2c.dtype)


def orbit_cameras(w2c: Tensor, num_frames: int) -> Tensor:
    """A turntable: `num_frames` cameras on a circle around the up axis, looking at the world origin.

    The circle matches the given cameras w2c [V, 4, 4] (e.g. a scene's input views): its up axis is the
    `up_axis` of those cameras, its radius and height their mean distance and mean height along that axis;
    it starts at the azimuth of the first camera. Returns [num_frames, 4, 4].
    """
    c2w = camera_to_world(w2c)
    up = up_axis(w2c)
    centers = c2w[:, :3, 3]
    height = (centers @ up).mean()
    radius = centers.norm(dim=-1).mean()
    horizontal = (radius**2 - height**2).clamp(min=1e-8 * radius**2).sqrt()
    # An orthonormal basis (a, b) of the plane orthogonal to up, a towards the first camera.
    first = centers[0] - (centers[0] @ up) * up
    if first.norm() < 1e-6 * radius:  # first camera on the axis: any horizontal direction will do
        first = torch.linalg.cross(up, torch.eye(3, dtype=up.dtype)[int(up.abs().argmin())], dim=0)
    a = F.normalize(first, dim=0)
    b = torch.linalg.cross(up, a, dim=0)
    angles = torch.arange(num_frames, dtype=w2c.dtype) * (2 * math.pi / num_frames)
    eyes = horizontal * (angles.cos()[:, None] * a + angles.sin()[:, None] * b) + height * up
    return look_at(eyes, torch.zeros_like(eyes), up.expand_as(eyes))


def normalize_cameras(w2c: Tensor, reference: Tensor) -> Tensor:
    """Pose normalisation for scene-level data: express all cameras w2c [V, 4, 4] in the frame of the
    `reference` cameras [R, 4, 4] (e.g. the input views): origin at their mean centre, axes of the first
    reference camera, scaled so the farthest reference camera is at distance 1. Returns [V, 4, 4]."""
    c2w_ref = camera_to_world(reference)
    frame = c2w_ref[0].clone()
    frame[:3, 3] = c2w_ref[:, :3, 3].mean(dim=0)
    c2w = torch.linalg.solve(frame, camera_to_world(w2c))  # frame^-1 @ c2w, without forming the inverse
    ref_centers = c2w_ref[:, :3, 3] - frame[:3, 3]
    scale = ref_centers.norm(dim=-1).max().clamp(min=1e-8)
    c2w[..., :3, 3] = c2w[..., :3, 3] / scale
    return camera_to_world(c2w)  # the rigid inverse of a rigid c2w is its w2c


def scale_intrinsics(intrinsics: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """Intrinsics [..., 4] of the same camera after resizing its image by (scale_x, scale_y): with pixel
    centres at +0.5, a resize scales fx, cx by scale_x and fy, cy by scale_y exactly."""
    factors = torch.tensor(
        [scale_x, scale_y, scale_x, scale_y], dtype=intrinsics.dtype, device=intrinsics.device
    )
    return intrinsics * factors
