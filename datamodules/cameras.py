"""Pinhole camera helpers in the OpenCV convention, numpy only.

Camera axes: x right, y down, z forward (into the scene). ``w2c`` is the 4x4 world-to-camera matrix
``[R | t]``, so a world point X maps to camera coordinates ``R X + t`` and the camera centre is
``-R^T t``. Intrinsics are ``(fx, fy, cx, cy)`` in pixels; pixel ``(row i, column j)`` covers
``[j, j+1] x [i, i+1]`` and its centre is at ``(u, v) = (j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import math

import numpy as np


def intrinsics_from_fov(fov_deg: float, height: int, width: int) -> np.ndarray:
    """``(fx, fy, cx, cy)`` of a centred camera with square pixels whose field of view across the
    shorter image side is ``fov_deg``."""
    fx = min(height, width) / (2 * math.tan(math.radians(fov_deg) / 2))
    return np.array([fx, fx, width / 2, height / 2])


def look_at_w2c(eyes: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """World-to-camera ``[N, 4, 4]`` of cameras at ``eyes`` ``[N, 3]`` looking at ``target``, with
    ``up`` (world) pointing up in the image (towards smaller v). Eyes must not sit straight above or
    below the target along ``up``."""
    eyes = np.atleast_2d(np.asarray(eyes, dtype=np.float64))
    forward = np.asarray(target, dtype=np.float64) - eyes
    forward /= np.linalg.norm(forward, axis=-1, keepdims=True)
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    norm = np.linalg.norm(right, axis=-1, keepdims=True)
    if (norm < 1e-6).any():
        raise ValueError("a camera looks along the up vector; its orientation is undefined")
    right /= norm
    down = np.cross(forward, right)  # right x down = forward: a right-handed camera frame
    rot = np.stack([right, down, forward], axis=1)  # rows: camera axes in world coordinates
    w2c = np.tile(np.eye(4), (len(eyes), 1, 1))
    w2c[:, :3, :3] = rot
    w2c[:, :3, 3] = -np.einsum("nij,nj->ni", rot, eyes)
    return w2c


def camera_centers(w2c: np.ndarray) -> np.ndarray:
    """Camera centres ``[N, 3]`` (world) of ``w2c`` ``[N, 4, 4]``: ``-R^T t``."""
    w2c = np.asarray(w2c, dtype=np.float64)
    return -np.einsum("nji,nj->ni", w2c[:, :3, :3], w2c[:, :3, 3])


def pixel_rays(
    intrinsics: np.ndarray, w2c: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rays through the pixel centres.

    Returns ``origins`` ``[V, 3]`` (camera centres) and unit ``directions`` ``[V, H, W, 3]`` in world
    coordinates, for intrinsics ``[V, 4]`` and w2c ``[V, 4, 4]``.
    """
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    w2c = np.asarray(w2c, dtype=np.float64)
    u = np.arange(width) + 0.5
    v = np.arange(height) + 0.5
    fx, fy, cx, cy = (intrinsics[:, i, None, None] for i in range(4))
    x = np.broadcast_to((u[None, None, :] - cx) / fx, (len(w2c), height, width))
    y = np.broadcast_to((v[None, :, None] - cy) / fy, (len(w2c), height, width))
    # R^T (x, y, 1): the rows of R are the camera axes in world coordinates.
    rot = w2c[:, None, None, :3, :3]
    norm = np.sqrt(x * x + y * y + 1)[..., None]  # a rotation keeps the length of (x, y, 1)
    dirs = (x[..., None] * rot[..., 0, :] + y[..., None] * rot[..., 1, :] + rot[..., 2, :]) / norm
    return camera_centers(w2c), dirs


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
