"""Pinhole camera helpers in the OpenCV convention for the data layer (numpy in, numpy out).

The camera math itself (look-at, centres, rays) lives once, in torch, in :mod:`lact.geometry`; the
functions here call it in float64 and add what only data preparation needs (field-of-view intrinsics,
projection, resize-and-crop).

Camera axes: x right, y down, z forward (into the scene). ``w2c`` is the 4x4 world-to-camera matrix
``[R | t]``, so a world point X maps to camera coordinates ``R X + t`` and the camera centre is
``-R^T t``. Intrinsics are ``(fx, fy, cx, cy)`` in pixels; pixel ``(row i, column j)`` covers
``[j, j+1] x [i, i+1]`` and its centre is at ``(u, v) = (j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lact import geometry


def intrinsics_from_fov(fov_deg: float, height: int, width: int) -> np.ndarray:
    """``(fx, fy, cx, cy)`` of a centred camera with square pixels whose field of view across the
    shorter image side is ``fov_deg``."""
    fx = min(height, width) / (2 * math.tan(math.radians(fov_deg) / 2))
    return np.array([fx, fx, width / 2, height / 2])


def _torch64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def look_at_w2c(eyes: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """World-to-camera ``[N, 4, 4]`` (float64) of cameras at ``eyes`` ``[N, 3]`` looking at ``target``, with
    ``up`` (world) pointing up in the image (towards smaller v): :func:`lact.geometry.look_at` on numpy.
    Eyes must not sit straight above or below the target along ``up``."""
    eyes = _torch64(np.atleast_2d(eyes))
    w2c = geometry.look_at(eyes, _torch64(target).expand_as(eyes), _torch64(up).expand_as(eyes)).numpy()
    # A camera looking along `up` has no defined right axis: its rotation degenerates (det 0).
    if not np.allclose(np.linalg.det(w2c[:, :3, :3]), 1.0, atol=1e-6):
        raise ValueError("a camera looks along the up vector; its orientation is undefined")
    return w2c


def camera_centers(w2c: np.ndarray) -> np.ndarray:
    """Camera centres ``[N, 3]`` (world, float64) of ``w2c`` ``[N, 4, 4]``: :func:`lact.geometry.camera_centers`."""
    return geometry.camera_centers(_torch64(w2c)).numpy()


def pixel_rays(
    intrinsics: np.ndarray, w2c: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rays through the pixel centres, float64: :func:`lact.geometry.camera_rays` on numpy.

    Returns ``origins`` ``[V, 3]`` (camera centres) and unit ``directions`` ``[V, H, W, 3]`` in world
    coordinates, for intrinsics ``[V, 4]`` and w2c ``[V, 4, 4]``.
    """
    w2c = _torch64(w2c)
    _, directions = geometry.camera_rays(_torch64(intrinsics), w2c, height, width)
    return geometry.camera_centers(w2c).numpy(), directions.numpy()


def project(points: np.ndarray, intrinsics: np.ndarray, w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``uv`` ``[V, N, 2]`` and depths ``[V, N]`` of world ``points`` ``[N, 3]``."""
    points = np.asarray(points, dtype=np.float64)
    w2c = np.asarray(w2c, dtype=np.float64)
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    cam = np.einsum("vij,nj->vni", w2c[:, :3, :3], points) + w2c[:, None, :3, 3]
    depth = cam[..., 2]
    uv = np.stack(
        [
            intrinsics[:, None, 0] * cam[..., 0] / depth + intrinsics[:, None, 2],
            intrinsics[:, None, 1] * cam[..., 1] / depth + intrinsics[:, None, 3],
        ],
        axis=-1,
    )
    return uv, depth


def cover_crop(intrinsics: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]):
    """Resize-to-cover then centre-crop an image of ``src_hw`` = (H, W) to ``dst_hw``.

    Returns ``(new_intrinsics [..., 4], resized (W, H), crop box (left, top, right, bottom))``: resize
    the image to ``resized``, then crop ``box``. With pixel centres at +0.5 a pixel coordinate simply
    scales with the image (``u' = u * W'/W``), then shifts by the crop offset.
    """
    (h, w), (out_h, out_w) = src_hw, dst_hw
    scale = max(out_h / h, out_w / w)
    new_w, new_h = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    sx, sy = new_w / w, new_h / h
    intr = np.array(intrinsics, dtype=np.float64)
    intr[..., 0] *= sx
    intr[..., 1] *= sy
    intr[..., 2] = intr[..., 2] * sx - left
    intr[..., 3] = intr[..., 3] * sy - top
    return intr, (new_w, new_h), (left, top, left + out_w, top + out_h)
