"""The three shard formats: field names, safe encoders and decoders, and per-sample validation.

A sample is a dict of ``field -> bytes`` plus ``__key__`` and ``__shard__``; in the tar file the entry
``<key>.<field>`` holds one field. webdataset splits an entry name at the *first* dot, so keys never
contain a dot (field names may: ``000.png``).

- scenes: ``cameras.json`` (a list with one ``{w, h, fx, fy, cx, cy, w2c}`` per view, OpenCV convention,
  ``w2c`` 4x4 world-to-camera) and ``000.png``, ``001.png``, ... (RGB, one per view);
- tokens: ``tokens.npy`` (1-D uint16 when the vocabulary fits, else uint32) and ``meta.json``;
- videos: ``frames.npy`` (uint8 ``[T, H, W, 3]``) or ``latents.npy`` (float16 ``[C, T, h, w]``),
  optional ``caption.txt``.

Decoding never unpickles: npy is read with ``allow_pickle=False``, images with PIL, json and text as
UTF-8. Every decode error is a :class:`DamagedSampleError` naming the shard, the key and the field.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from datamodules.errors import DamagedSampleError

# Extensions whose usual decoder unpickles (pickle, torch.load, joblib); refused wherever they appear.
PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib", "dill"})
KEY_PATTERN = re.compile(r"[A-Za-z0-9_\-]+")
TOKEN_DTYPES = (np.uint16, np.uint32)


def check_key(key: str) -> str:
    """Return ``key`` if it is usable as a sample key (letters, digits, ``_``, ``-``), else raise ValueError."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key) or key.startswith("__"):
        raise ValueError(
            f"sample key {key!r} is not allowed: use letters, digits, '_' and '-' only "
            "(webdataset splits entry names at the first dot; '__' starts metadata)"
        )
    return key


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id in ``[0, vocab_size)`` fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def view_field(index: int) -> str:
    """Field name of view ``index`` in a scene sample: ``000.png``, ``001.png``, ..."""
    return f"{index:03d}.png"


# ---------------------------------------------------------------- encoders (writer side)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W, 3]`` image (lossless, so decoding gives the same values)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # uint8 [H, W, 3] is RGB
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj) -> bytes:
    # Python's float repr round-trips exactly, so cameras written here are read back bit for bit.
    return json.dumps(obj, allow_nan=False).encode("utf-8")


def _as_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype == object:
        raise ValueError(f"{name}: object arrays cannot be stored (they would need pickle)")
    return x


def encode_scene(images, intrinsics, w2c) -> dict[str, bytes]:
    """Fields of one scene sample.

    Args:
        images: uint8 ``[V, H, W, 3]``, RGB.
        intrinsics: ``[V, 4]`` pinhole ``(fx, fy, cx, cy)`` in pixels; pixel centres at +0.5.
        w2c: ``[V, 4, 4]`` world-to-camera matrices, OpenCV convention (x right, y down, z forward).
    """
    images, intrinsics, w2c = (
        _as_numpy(a, n) for a, n in ((images, "images"), (intrinsics, "intrinsics"), (w2c, "w2c"))
    )
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [V, H, W, 3], got {images.dtype} {list(images.shape)}")
    views, height, width = images.shape[:3]
    if intrinsics.shape != (views, 4):
        raise ValueError(f"intrinsics must be [V={views}, 4] (fx, fy, cx, cy), got {list(intrinsics.shape)}")
    if w2c.shape != (views, 4, 4):
        raise ValueError(f"w2c must be [V={views}, 4, 4], got {list(w2c.shape)}")
    problems: dict[str, list[int]] = {}
    for i in range(views):
        problem = camera_problem(*intrinsics[i].tolist(), w2c[i])
        if problem is not None:
            problems.setdefault(problem, []).append(i)
    for problem, bad in problems.items():
        rotation = "w2c[:3, :3] "
        if problem.startswith(rotation):
            raise ValueError(f"{rotation}of views {bad} {problem[len(rotation) :]}")
        raise ValueError(f"views {bad}: {problem}")
    cameras = [
        {
            "w": width,
            "h": height,
            **{name: float(v) for name, v in zip(("fx", "fy", "cx", "cy"), intrinsics[i])},
            "w2c": [[float(v) for v in row] for row in w2c[i]],
        }
        for i in range(views)
    ]
    fields = {"cameras.json": encode_json(cameras)}
    fields.update({view_field(i): encode_png(images[i]) for i in range(views)})
    return fields


def encode_tokens(tokens, meta: dict) -> dict[str, bytes]:
    """Fields of one token sample: ``tokens`` is 1-D uint16 or uint32; ``meta`` a JSON-able dict
    (ids must be below its ``vocab_size``, when given)."""
    tokens = _as_numpy(tokens, "tokens")
    if tokens.ndim != 1 or tokens.dtype not in TOKEN_DTYPES:
        raise ValueError(f"tokens must be 1-D uint16 or uint32, got {tokens.dtype} {list(tokens.shape)}")
    vocab = meta.get("vocab_size")
    if isinstance(vocab, int) and tokens.size and int(tokens.max()) >= vocab:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size {vocab}")
    return {"tokens.npy": encode_npy(tokens), "meta.json": encode_json(meta)}


def encode_video(
    frames=None, latents=None, caption: str | None = None, caption_embedding=None
) -> dict[str, bytes]:
    """Fields of one video sample: exactly one of ``frames`` (uint8 ``[T, H, W, 3]``) and ``latents``
    (float16 ``[C, T, h, w]``), plus an optional caption and optional caption embeddings (float16
    ``[tokens, width]``, from the user's text encoder, for conditioned video models)."""
    if (frames is None) == (latents is None):
        raise ValueError("give exactly one of frames and latents")
    fields = {}
    if frames is not None:
        frames = _as_numpy(frames, "frames")
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        fields["frames.npy"] = encode_npy(frames)
    else:
        latents = _as_numpy(latents, "latents")
        if latents.dtype != np.float16 or latents.ndim != 4:
            raise ValueError(
                f"latents must be float16 [C, T, h, w], got {latents.dtype} {list(latents.shape)}"
            )
        fields["latents.npy"] = encode_npy(latents)
    if caption is not None:
        fields["caption.txt"] = caption.encode("utf-8")
    if caption_embedding is not None:
        embedding = _as_numpy(caption_embedding, "caption_embedding")
        if embedding.dtype != np.float16 or embedding.ndim != 2:
            raise ValueError(
                f"caption_embedding must be float16 [tokens, width], got {embedding.dtype} {list(embedding.shape)}"
            )
        fields["caption_embedding.npy"] = encode_npy(embedding)
    return fields


# ---------------------------------------------------------------- decoders (reader side)


def _damaged(sample: dict, reason: str) -> DamagedSampleError:
    return DamagedSampleError(sample.get("__shard__", "?"), sample.get("__key__"), reason)


def _field(sample: dict, name: str) -> bytes:
    if name not in sample:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise _damaged(sample, f"missing required field {name!r} (present: {present})")
    return sample[name]


def decode_npy(sample: dict, name: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(io.BytesIO(_field(sample, name)), allow_pickle=False)
    except DamagedSampleError:
        raise
    except Exception as exn:  # ValueError for object arrays or bad headers, EOFError for short data
        raise _damaged(sample, f"field {name!r} is not a readable .npy array ({exn})") from exn


def decode_json(sample: dict, name: str):
    try:
        return json.loads(_field(sample, name).decode("utf-8"))
    except DamagedSampleError:
        raise
    except Exception as exn:
        raise _damaged(sample, f"field {name!r} is not valid UTF-8 JSON ({exn})") from exn


def decode_text(sample: dict, name: str) -> str:
    try:
        return _field(sample, name).decode("utf-8")
    except UnicodeDecodeError as exn:
        raise _damaged(sample, f"field {name!r} is not UTF-8 text ({exn})") from exn


def decode_rgb(sample: dict, name: str) -> np.ndarray:
    """uint8 ``[H, W, 3]`` from a PNG/JPEG field; RGB only (the writers never store alpha)."""
    try:
        with Image.open(io.BytesIO(_field(sample, name))) as img:
            img.load()
            mode = img.mode
            array = np.asarray(img)
    except DamagedSampleError:
        raise
    except Exception as exn:
        raise _damaged(sample, f"field {name!r} is not a readable image ({exn})") from exn
    if mode != "RGB":
        raise _damaged(sample, f"image {name!r} has mode {mode}, expected RGB")
    return array


def _check_array(sample: dict, name: str, array: np.ndarray, dtypes: Sequence, ndim: int, shape=None) -> None:
    if array.dtype not in [np.dtype(d) for d in dtypes] or array.ndim != ndim:
        want = " or ".join(np.dtype(d).name for d in dtypes)
        raise _damaged(
            sample, f"{name} is {array.dtype} {list(array.shape)}, expected {want} with {ndim} dims"
        )
    if shape is not None and any(s is not None and s != a for s, a in zip(shape, array.shape)):
        raise _damaged(sample, f"{name} has shape {list(array.shape)}, expected {list(shape)} (None = any)")


def _is_rotation(rot: np.ndarray, tol: float = 1e-3) -> bool:
    rot = np.asarray(rot, dtype=np.float64)
    return bool(np.abs(rot @ rot.T - np.eye(3)).max() <= tol and abs(np.linalg.det(rot) - 1) <= tol)


def camera_problem(fx, fy, cx, cy, w2c) -> str | None:
    """What is wrong with one pinhole camera (intrinsics in pixels, ``w2c`` 4x4 world-to-camera), naming
    the field, or None when it is usable: finite numbers, fx and fy > 0, a rotation in ``w2c[:3, :3]``."""
    for name, value in (("fx", fx), ("fy", fy), ("cx", cx), ("cy", cy)):
        if not np.isfinite(value):
            return f"{name} is {value}, expected a finite number of pixels"
    for name, value in (("fx", fx), ("fy", fy)):
        if value <= 0:
            return f"{name} = {value}, expected a focal length > 0 (pixels)"
    w2c = np.asarray(w2c, dtype=np.float64)
    if w2c.shape != (4, 4) or not np.isfinite(w2c).all():
        return f"w2c must be a finite 4x4 matrix, got {list(w2c.shape)}" + (
            " with non-finite entries" if w2c.shape == (4, 4) else ""
        )
    # A camera that is not a rotation + translation would silently corrupt every ray built from it.
    if not _is_rotation(w2c[:3, :3]):
        return "w2c[:3, :3] is not a rotation (expected OpenCV world-to-camera)"
    return None


def _check_camera(sample: dict, index: int, cam) -> tuple[int, int, list[float], np.ndarray]:
    if not isinstance(cam, dict):
        raise _damaged(sample, f"cameras.json view {index} is {type(cam).__name__}, expected an object")
    missing = [k for k in ("w", "h", "fx", "fy", "cx", "cy", "w2c") if k not in cam]
    if missing:
        raise _damaged(sample, f"cameras.json view {index} lacks {missing}")
    try:
        intr = [float(cam[k]) for k in ("fx", "fy", "cx", "cy")]
        w2c = np.asarray(cam["w2c"], dtype=np.float64)
        width, height = int(cam["w"]), int(cam["h"])
    except (TypeError, ValueError) as exn:
        raise _damaged(sample, f"cameras.json view {index} has a non-numeric value ({exn})") from exn
    problem = camera_problem(*intr, w2c)
    if problem is not None:
        raise _damaged(sample, f"cameras.json view {index}: {problem}")
    return width, height, intr, w2c


def decode_scene(
    sample: dict, num_views: int | None = None, image_size: tuple[int, int] | None = None
) -> dict:
    """Decode and check one scene sample.

    Returns a dict with ``images`` uint8 ``[V, H, W, 3]``, ``intrinsics`` float32 ``[V, 4]`` (fx, fy, cx, cy
    in pixels), ``w2c`` float32 ``[V, 4, 4]`` (numpy arrays), ``key`` and ``shard``. ``num_views`` and
    ``image_size`` = (H, W), when given, must match exactly.
    """
    cameras = decode_json(sample, "cameras.json")
    if not isinstance(cameras, list) or not cameras:
        raise _damaged(sample, "cameras.json must be a non-empty list with one object per view")
    if num_views is not None and len(cameras) != num_views:
        raise _damaged(sample, f"scene has {len(cameras)} views, expected num_views={num_views}")
    expected = {view_field(i) for i in range(len(cameras))}
    extra = sorted(k for k in sample if k.endswith(".png") and k not in expected)
    if extra:
        raise _damaged(sample, f"images {extra} do not match the {len(cameras)} views in cameras.json")
    images, intrinsics, w2cs = [], [], []
    for i, cam in enumerate(cameras):
        width, height, intr, w2c = _check_camera(sample, i, cam)
        image = decode_rgb(sample, view_field(i))
        if image.shape != (height, width, 3):
            raise _damaged(
                sample,
                f"image {view_field(i)} is {list(image.shape)}, cameras.json says h={height} w={width}",
            )
        if images and image.shape != images[0].shape:
            raise _damaged(
                sample, f"image {view_field(i)} is {list(image.shape)}, view 0 is {list(images[0].shape)}"
            )
        images.append(image)
        intrinsics.append(intr)
        w2cs.append(w2c)
    images = np.stack(images)
    if image_size is not None and tuple(images.shape[1:3]) != tuple(image_size):
        raise _damaged(
            sample, f"images are {list(images.shape[1:3])}, expected image_size={list(image_size)}"
        )
    return {
        "images": images,
        "intrinsics": np.asarray(intrinsics, dtype=np.float32),
        "w2c": np.asarray(w2cs, dtype=np.float32),
        "key": sample["__key__"],
        "shard": sample["__shard__"],
    }


def decode_tokens(sample: dict, length: int | None = None, vocab_size: int | None = None) -> dict:
    """Decode one token sample: ``tokens`` int64 ``[L]`` (numpy), ``meta`` dict, ``key``, ``shard``.

    ``length``, when given, must equal L (``seq_len + 1`` for packed sequences). Ids at or above
    ``vocab_size`` (the model's vocabulary, when given) or the ``vocab_size`` named in meta.json are
    rejected: they would index past the embedding.
    """
    tokens = decode_npy(sample, "tokens.npy")
    _check_array(sample, "tokens.npy", tokens, TOKEN_DTYPES, 1, None if length is None else (length,))
    meta = decode_json(sample, "meta.json") if "meta.json" in sample else {}
    if not isinstance(meta, dict):
        raise _damaged(sample, f"meta.json is {type(meta).__name__}, expected an object")
    vocab = meta.get("vocab_size")
    if isinstance(vocab, int) and tokens.size and int(tokens.max()) >= vocab:
        raise _damaged(sample, f"token id {int(tokens.max())} >= vocab_size {vocab} from meta.json")
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        raise _damaged(
            sample,
            f"token id {int(tokens.max())} >= the model's vocab_size {vocab_size}; the shard was written "
            "for another vocabulary (check the tokenizer, or the model's vocab_size)",
        )
    return {
        "tokens": tokens.astype(np.int64),
        "meta": meta,
        "key": sample["__key__"],
        "shard": sample["__shard__"],
    }


def decode_video(sample: dict, field: str = "frames", shape: Sequence[int | None] | None = None) -> dict:
    """Decode one video sample.

    ``field="frames"`` gives ``frames`` uint8 ``[T, H, W, 3]``; ``field="latents"`` gives ``latents``
    float16 ``[C, T, h, w]``. ``shape`` (None entries = any size) must match. ``caption`` is the
    caption text, or "" when the sample has none; ``caption_embedding`` float16 ``[tokens, width]`` is
    there when the sample has one.
    """
    if field not in ("frames", "latents"):
        raise ValueError(f"field must be 'frames' or 'latents', got {field!r}")
    array = decode_npy(sample, f"{field}.npy")
    if field == "frames":
        _check_array(sample, "frames.npy", array, (np.uint8,), 4, shape)
        if array.shape[-1] != 3:
            raise _damaged(sample, f"frames.npy is {list(array.shape)}, expected [T, H, W, 3]")
    else:
        _check_array(sample, "latents.npy", array, (np.float16,), 4, shape)
    caption = decode_text(sample, "caption.txt") if "caption.txt" in sample else ""
    out = {field: array, "caption": caption, "key": sample["__key__"], "shard": sample["__shard__"]}
    if "caption_embedding.npy" in sample:
        embedding = decode_npy(sample, "caption_embedding.npy")
        _check_array(sample, "caption_embedding.npy", embedding, (np.float16,), 2)
        out["caption_embedding"] = embedding
    return out
