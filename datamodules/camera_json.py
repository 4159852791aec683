"""Import scenes in the published LaCT NVS layout: a folder with ``opencv_cameras.json`` and its images.

``opencv_cameras.json`` is a list with one entry per view (a ``{"frames": [...]}`` wrapper is accepted
too)::

    {"w": 512, "h": 512, "fx": 548.99, "fy": 548.99, "cx": 256.0, "cy": 256.0,
     "w2c": [[...4 numbers...] x 4], "file_path": "renderings/00000000_rgba.png"}

``w2c`` is world-to-camera in the OpenCV convention and ``file_path`` is relative to the folder. RGBA
images are composited on white; an optional ``size`` = (H, W) resizes each view to cover that size and
crops the centre, with the intrinsics adjusted to match (see :func:`datamodules.cameras.cover_crop`).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from PIL import Image

from datamodules.cameras import cover_crop
from datamodules.formats import camera_problem

CAMERA_FILE = "opencv_cameras.json"
REQUIRED = ("w", "h", "fx", "fy", "cx", "cy", "w2c", "file_path")


def find_camera_json_scenes(root: str) -> list[str]:
    """``root`` itself when it holds opencv_cameras.json, else every folder below it that does (sorted)."""
    if os.path.isfile(os.path.join(root, CAMERA_FILE)):
        return [root]
    found = sorted(dirpath for dirpath, _, files in os.walk(root) if CAMERA_FILE in files)
    if not found:
        raise FileNotFoundError(f"no {CAMERA_FILE} in {root} or any folder below it")
    return found


def scene_key(folder: str, root: str) -> str:
    """A sample key from the folder's path below ``root``: characters outside [A-Za-z0-9_-] become '_'."""
    rel = os.path.relpath(folder, root)
    if rel == ".":  # the root is the scene itself: name it after the folder
        rel = os.path.basename(os.path.abspath(root))
    return re.sub(r"[^A-Za-z0-9_\-]", "_", rel) or "scene"


def read_camera_file(folder: str) -> list[dict]:
    """The frames of ``folder/opencv_cameras.json``, each checked (finite, fx and fy > 0, a rotation in
    w2c); every error names the file, the frame and the field."""
    path = os.path.join(folder, CAMERA_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            frames = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({exn})") from exn
    if isinstance(frames, dict) and "frames" in frames:
        frames = frames["frames"]
    if not isinstance(frames, list) or not frames:
        raise ValueError(f"{path}: expected a non-empty list of frames, got {type(frames).__name__}")
    for i, frame in enumerate(frames):
        missing = [k for k in REQUIRED if k not in frame] if isinstance(frame, dict) else list(REQUIRED)
        if missing:
            raise ValueError(f"{path}: frame {i} lacks {missing}")
        try:
            intrinsics = [float(frame[k]) for k in ("fx", "fy", "cx", "cy")]
            w2c = np.asarray(frame["w2c"], dtype=np.float64)
            size = int(frame["w"]), int(frame["h"])
        except (TypeError, ValueError) as exn:
            raise ValueError(
                f"{path}: frame {i} has a non-numeric w, h, fx, fy, cx, cy or w2c ({exn})"
            ) from exn
        if w2c.shape != (4, 4):
            raise ValueError(f"{path}: frame {i} w2c has shape {w2c.shape}, expected (4, 4)")
        problem = camera_problem(*intrinsics, w2c)
        if problem is not None:
            raise ValueError(f"{path}: frame {i}: {problem}")
        if min(size) < 1:
            raise ValueError(f"{path}: frame {i}: w x h = {size[0]} x {size[1]}, expected positive sizes")
    return frames


def load_rgb_on_white(path: str) -> np.ndarray:
    """uint8 ``[H, W, 3]``: an image file with any alpha composited over white."""
    try:
        return _load_rgb_on_white(path)
    except (OSError, ValueError) as exn:  # PIL's messages do not always name the file
        raise ValueError(f"{path}: not a readable image ({type(exn).__name__}: {exn})") from exn


def _load_rgb_on_white(path: str) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255
            rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
            return np.round(rgb * 255).astype(np.uint8)
        return np.asarray(img.convert("RGB"))


def load_camera_json_scene(folder: str, size: tuple[int, int] | None = None) -> dict:
    """One scene from a camera-JSON folder.

    Returns ``images`` uint8 ``[V, H, W, 3]``, ``intrinsics`` float32 ``[V, 4]`` (fx, fy, cx, cy in
    pixels of the returned images), ``w2c`` float32 ``[V, 4, 4]``. With ``size`` = (H, W) every view is
    resized to cover it (bicubic, antialiased) and centre-cropped; without it, all views must share one
    size already.
    """
    frames = read_camera_file(folder)
    images, intrinsics, w2cs = [], [], []
    for i, frame in enumerate(frames):
        path = os.path.join(folder, frame["file_path"])
        image = load_rgb_on_white(path)
        if image.shape[:2] != (int(frame["h"]), int(frame["w"])):
            raise ValueError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]}, frame {i} says {frame['w']}x{frame['h']}"
            )
        intr = np.array([frame[k] for k in ("fx", "fy", "cx", "cy")], dtype=np.float64)
        if size is not None:
            intr, resized, box = cover_crop(intr, image.shape[:2], size)
            pil = Image.fromarray(image)
            if resized != pil.size:
                pil = pil.resize(resized, Image.Resampling.BICUBIC)  # PIL filters over the whole footprint
            image = np.asarray(pil.crop(box))
        if images and image.shape != images[0].shape:
            raise ValueError(
                f"{path}: view {i} is {image.shape}, view 0 is {images[0].shape}; pass size=(H, W)"
            )
        images.append(image)
        intrinsics.append(intr)
        w2cs.append(np.asarray(frame["w2c"], dtype=np.float64))
    return {
        "images": np.stack(images),
        "intrinsics": np.asarray(intrinsics, dtype=np.float32),
        "w2c": np.asarray(w2cs, dtype=np.float32),
    }
