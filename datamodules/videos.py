"""Procedural videos of moving shapes, where remembering earlier frames pays off.

Each clip has 2-4 flat-coloured shapes (circle, square, triangle, ring) on a plain background, drawn in
a fixed depth order so they occlude each other. Every shape follows one of three smooth motions,
simulated in frame units (the short side of the frame is 1; positions are shape centres):

- ``bounce``: straight lines, reflected at the frame border (always visible);
- ``wander``: a smoothly turning heading inside an arena larger than the frame, so the shape leaves the
  picture and comes back later;
- ``fall``: gravity with elastic bounces on the floor and the side walls.

One more motion is only drawn when asked for (``motions=("wrap",)``): ``wrap`` crosses the frame fast in a
straight line, leaves it and, after a gap of several frames fully out of view, re-enters from the opposite
side (a conveyor wider than the frame). With ``colors="random"`` (an RGB colour per shape instead of one of
eight named ones) a re-entering shape's colour can only be known from the frames before it left: the
setting of benchmarks/video_memory.py.

Squares and triangles also spin. ``generate_video(seed, ...)`` is a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "ring")
MOTIONS = ("bounce", "wander", "fall")  # drawn by default
EXTRA_MOTIONS = ("wrap",)  # drawn only when `motions` names them
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (245, 220, 40),
    "cyan": (40, 220, 230),
    "magenta": (220, 50, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SUBSTEPS = 4  # integration steps per frame, so bounces are resolved within a frame


def _reflect(p: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    # Mirror positions that crossed a wall back inside and flip that velocity component (in place).
    below, above = p < lo, p > hi
    p[below] = 2 * lo[below] - p[below]
    p[above] = 2 * hi[above] - p[above]
    v[below | above] *= -1


def simulate(
    rng: np.random.Generator, motion: str, num_frames: int, extent: np.ndarray, radius: float
) -> np.ndarray:
    """Centre positions ``[T, 2]`` (x, y; y down) of one shape in a frame of size ``extent`` = (w, h)."""
    if motion == "wrap":
        return _wrap(rng, num_frames, extent, radius)
    speed = rng.uniform(0.025, 0.06)
    heading = rng.uniform(0, 2 * np.pi)
    v = speed * np.array([np.cos(heading), np.sin(heading)])
    if motion == "wander":
        margin = radius + rng.uniform(0.15, 0.4)  # beyond `radius` the shape is fully outside the frame
        lo, hi = -margin * np.ones(2), extent + margin
    else:
        lo, hi = radius * np.ones(2), extent - radius
    p = rng.uniform(lo, hi)
    turn_amp, turn_freq, turn_phase = (
        rng.uniform(0.05, 0.2),
        rng.uniform(0.05, 0.2),
        rng.uniform(0, 2 * np.pi),
    )
    gravity = np.array([0.0, rng.uniform(0.004, 0.008)])
    track = np.empty((num_frames, 2))
    dt = 1 / SUBSTEPS
    for t in range(num_frames):
        track[t] = p
        for s in range(SUBSTEPS):
            if motion == "wander":  # turn the velocity by a slowly varying angle
                angle = turn_amp * np.sin(turn_freq * (t + s * dt) + turn_phase) * dt
                c, sn = np.cos(angle), np.sin(angle)
                v = np.array([c * v[0] - sn * v[1], sn * v[0] + c * v[1]])
            elif motion == "fall":
                v = v + gravity * dt
            p = p + v * dt
            _reflect(p, v, lo, hi)
    return track


def _wrap(rng: np.random.Generator, num_frames: int, extent: np.ndarray, radius: float) -> np.ndarray:
    # Along x at 0.2-0.3 frame per frame (about 5 frames to cross), wrapping around a conveyor that reaches
    # `gap` beyond each side of the frame: 2 gap / speed, about 3-8 frames, fully out of view between exits
    # and re-entries. y stays at its start, so the re-entry point follows from the exit.
    speed = rng.uniform(0.2, 0.3) * rng.choice([-1, 1])
    gap = radius + rng.uniform(0.4, 0.8)
    lo, length = -gap, extent[0] + 2 * gap
    x0 = rng.uniform(lo, lo + length)
    y = rng.uniform(radius, extent[1] - radius)
    x = lo + np.mod(x0 - lo + speed * np.arange(num_frames), length)
    return np.stack([x, np.full(num_frames, y)], axis=-1)


def _masks(
    shape: str, track: np.ndarray, radius: float, spin: np.ndarray, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """Boolean ``[T, H, W]``: which pixel centres the shape covers in each frame."""
    dx = xs[None, None, :] - track[:, 0, None, None]
    dy = ys[None, :, None] - track[:, 1, None, None]
    if shape in ("circle", "ring"):
        d2 = dx * dx + dy * dy
        return (d2 <= radius**2) & (d2 >= (0.55 * radius) ** 2 if shape == "ring" else True)
    c, s = np.cos(spin)[:, None, None], np.sin(spin)[:, None, None]
    rx, ry = c * dx + s * dy, -s * dx + c * dy  # pixel position in the shape's spinning frame
    if shape == "square":
        return np.maximum(np.abs(rx), np.abs(ry)) <= 0.8 * radius
    inside = np.ones_like(rx, dtype=bool)
    for k in range(3):  # equilateral triangle: inside all three edges (inradius radius / 2)
        a = 2 * np.pi * k / 3 + np.pi / 2
        inside &= np.cos(a) * rx + np.sin(a) * ry <= 0.5 * radius
    return inside


def generate_video(
    seed: int | Sequence[int],
    *,
    num_frames: int = 16,
    height: int = 64,
    width: int = 64,
    num_objects=(2, 4),
    motions: Sequence[str] = MOTIONS,
    colors: str = "palette",
    radius: tuple[float, float] = (0.09, 0.18),
) -> dict:
    """One procedural clip.

    ``motions``: the motions a shape draws from (MOTIONS and EXTRA_MOTIONS); ``colors``: "palette" (eight
    named colours, distinct within a clip) or "random" (a uniform RGB colour per shape); ``radius``: the
    range (lo, hi) of shape radii, uniform, in units of the short side of the frame (larger shapes put more
    of a clip's pixels on what a re-entering shape looks like).

    Returns ``frames`` uint8 ``[T, H, W, 3]``, ``caption`` (str), ``tracks`` float ``[K, T, 2]``
    (shape centres in frame units, x right, y down; the frame spans ``extent``), ``radii`` ``[K]``,
    ``motions`` and ``shapes`` (lists of K names, back to front), ``extent`` (w, h).
    """
    unknown = [m for m in motions if m not in MOTIONS + EXTRA_MOTIONS]
    if not motions or unknown:
        raise ValueError(f"motions must be a non-empty subset of {MOTIONS + EXTRA_MOTIONS}, got {motions!r}")
    if colors not in ("palette", "random"):
        raise ValueError(f"colors must be 'palette' or 'random', got {colors!r}")
    if len(radius) != 2 or not 0 < radius[0] <= radius[1] <= 0.5:
        raise ValueError(f"radius must be a range (lo, hi) with 0 < lo <= hi <= 0.5, got {radius!r}")
    choices = tuple(motions)  # `motions` below is the list of drawn ones
    rng = np.random.default_rng(seed)
    extent = np.array([width, height]) / min(width, height)
    xs = (np.arange(width) + 0.5) / min(width, height)
    ys = (np.arange(height) + 0.5) / min(width, height)
    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    names = [list(COLORS)[i] for i in rng.permutation(len(COLORS))[:count]]
    rgb = [COLORS[name] for name in names]
    if colors == "random":
        rgb = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(count)]
        names = ["rgb({}, {}, {})".format(*c) for c in rgb]
    background = rng.uniform(20, 110, 3) if rng.random() < 0.7 else rng.uniform(150, 200, 3)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = np.round(background).astype(np.uint8)
    tracks, radii, motions, shapes, phrases = [], [], [], [], []
    for k in range(count):
        shape, motion = SHAPES[rng.integers(len(SHAPES))], choices[rng.integers(len(choices))]
        size = rng.uniform(*radius)
        track = simulate(rng, motion, num_frames, extent, size)
        spin = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.15, 0.15) * np.arange(num_frames)
        frames[_masks(shape, track, size, spin, xs, ys)] = rgb[k]  # later shapes cover earlier ones
        tracks.append(track)
        radii.append(size)
        motions.append(motion)
        shapes.append(shape)
        verb = {
            "bounce": "bouncing around",
            "wander": "wandering in and out of view",
            "fall": "falling and bouncing",
            "wrap": "crossing out of view and back in",
        }
        article = "an" if names[k][0] in "aeiou" else "a"
        phrases.append(f"{article} {names[k]} {shape} {verb[motion]}")
    return {
        "frames": frames,
        "caption": ", ".join(phrases),
        "tracks": np.stack(tracks),
        "radii": np.array(radii),
        "motions": motions,
        "shapes": shapes,
        "extent": extent,
    }


def frames_to_latents(frames: np.ndarray, downsample: int = 1) -> np.ndarray:
    """Pixel-space stand-in for VAE latents: float16 ``[3, T, H/f, W/f]`` in [-1, 1], average-pooled
    by ``f = downsample`` (H and W must be divisible by f)."""
    t, h, w, c = frames.shape
    if h % downsample or w % downsample:
        raise ValueError(f"frame size {h}x{w} is not divisible by downsample={downsample}")
    x = frames.astype(np.float32) / 127.5 - 1
    x = x.reshape(t, h // downsample, downsample, w // downsample, downsample, c).mean(axis=(2, 4))
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.float16)
