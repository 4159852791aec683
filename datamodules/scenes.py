"""Procedural object-centric scenes: a few coloured primitives, ray cast exactly, seen from N cameras.

A scene is 2-4 primitives (spheres, boxes, cylinders) with random size, position, orientation, colour
and sometimes stripes (painted in the primitive's own frame, so they turn with it), grouped around
the origin and shrunk when needed so that the object never leaves the frame. Each pixel is one ray through the pixel centre; its colour is the nearest
hit's albedo times Lambertian shading under a fixed world light, or the background. Cameras sit on a
sphere of radius ``distance`` around the origin, look at it, and keep world +z up in the image.

``generate_scene(seed, ...)`` depends on nothing but its arguments (numpy only, float64), so the same
seed gives the same pixels anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from datamodules.cameras import intrinsics_from_fov, look_at_w2c, pixel_rays

KINDS = ("sphere", "box", "cylinder")
LIGHT = np.array([0.45, 0.3, 0.84]) / np.linalg.norm([0.45, 0.3, 0.84])  # from above and to the side
AMBIENT = 0.4
NO_HIT = np.inf


@dataclass(frozen=True)
class Primitive:
    """One primitive. ``size``: sphere (radius, -, -); box (half extents x, y, z); cylinder (radius, -,
    half height), in its local frame. ``rotation`` [3, 3] maps local to world; ``color`` RGB in [0, 1];
    ``stripes`` the stripe frequency along local z (0 = plain)."""

    kind: str
    center: np.ndarray
    rotation: np.ndarray
    size: np.ndarray
    color: np.ndarray
    stripes: float


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation [3, 3] (QR of a Gaussian matrix with the sign fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_primitives(rng: np.random.Generator, count: int) -> list[Primitive]:
    hues = rng.permutation(12)[:count] / 12 + rng.uniform(0, 1 / 12)
    prims = []
    for i in range(count):
        kind = KINDS[rng.integers(len(KINDS))]
        radius = rng.uniform(0.25, 0.5)
        if kind == "sphere":
            size = np.array([radius, radius, radius])
        elif kind == "box":
            size = rng.uniform(0.15, 0.42, 3)
        else:
            size = np.array([radius * 0.8, radius * 0.8, rng.uniform(0.2, 0.5)])
        # The first primitive anchors the object at the origin; the others cluster around it.
        center = np.zeros(3) if i == 0 else rng.normal(0, 1, 3) / np.sqrt(3) * rng.uniform(0.3, 0.55)
        prims.append(
            Primitive(
                kind=kind,
                center=center,
                rotation=random_rotation(rng),
                size=size,
                color=_hsv_to_rgb(hues[i] % 1.0, rng.uniform(0.55, 0.9), rng.uniform(0.7, 1.0)),
                stripes=float(rng.choice([0.0, 0.0, rng.uniform(14, 24)])),
            )
        )
    return prims


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def random_cameras(rng, num_views, height, width, *, distance=2.7, fov_deg=50.0, elevation_deg=(-15.0, 65.0)):
    """Intrinsics ``[V, 4]`` and w2c ``[V, 4, 4]`` of cameras at uniformly random directions on the
    sphere of radius ``distance`` (elevation band ``elevation_deg``), all looking at the origin."""
    lo, hi = np.sin(np.radians(elevation_deg))
    z = rng.uniform(lo, hi, num_views)  # uniform in z = uniform in area on the sphere
    azimuth = rng.uniform(0, 2 * np.pi, num_views)
    ring = np.sqrt(1 - z**2)
    eyes = distance * np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), z], axis=-1)
    intrinsics = np.tile(intrinsics_from_fov(fov_deg, height, width), (num_views, 1))
    return intrinsics, look_at_w2c(eyes)


def _hit_sphere(o, d, size):
    # o, d: [N, 3] rays in the primitive's frame (d unit length). Returns t [N], local normal [N, 3].
    b = np.einsum("ni,ni->n", o, d)
    c = np.einsum("ni,ni->n", o, o) - size[0] ** 2
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0))
    t = np.where((disc >= 0) & (t > 0), t, NO_HIT)
    return t, o + np.where(np.isfinite(t), t, 0)[:, None] * d


def _hit_box(o, d, size):
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1, t2 = (-size - o) * inv, (size - o) * inv
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    near = np.where(np.isnan(near), -np.inf, near)  # a ray parallel to a slab and inside it
    far = np.where(np.isnan(far), np.inf, far)
    t_near, t_far = near.max(axis=1), far.min(axis=1)
    t = np.where((t_near <= t_far) & (t_near > 0), t_near, NO_HIT)
    axis = near.argmax(axis=1)  # the slab entered last is the face that was hit
    normal = np.zeros_like(o)
    normal[np.arange(len(o)), axis] = -np.sign(d[np.arange(len(o)), axis])
    return t, normal


def _hit_cylinder(o, d, size):
    radius, half = size[0], size[2]
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
    c = o[:, 0] ** 2 + o[:, 1] ** 2 - radius**2
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / a
        z_side = o[:, 2] + t_side * d[:, 2]
        side_ok = (disc >= 0) & (a > 1e-12) & (t_side > 0) & (np.abs(z_side) <= half)
        t_side = np.where(side_ok, t_side, NO_HIT)
        # The cap facing the ray origin: z = +half when the origin is above the cylinder, else -half.
        cap_z = np.where(o[:, 2] > 0, half, -half)
        t_cap = (cap_z - o[:, 2]) / d[:, 2]
        p_cap = o + np.nan_to_num(t_cap, posinf=0, neginf=0)[:, None] * d
        cap_ok = (t_cap > 0) & (p_cap[:, 0] ** 2 + p_cap[:, 1] ** 2 <= radius**2)
    t_cap = np.where(cap_ok, t_cap, NO_HIT)
    t = np.minimum(t_side, t_cap)
    p = o + np.where(np.isfinite(t), t, 0)[:, None] * d
    normal = np.where(
        (t_cap <= t_side)[:, None], np.stack([0 * cap_z, 0 * cap_z, np.sign(cap_z)], 1), p * [1, 1, 0]
    )
    return t, normal


HITTERS = {"sphere": _hit_sphere, "box": _hit_box, "cylinder": _hit_cylinder}


def _bounding_radius(prim: Primitive) -> float:
    if prim.kind == "sphere":
        return float(prim.size[0])
    if prim.kind == "box":
        return float(np.linalg.norm(prim.size))
    return float(np.hypot(prim.size[0], prim.size[2]))


def _rotate(vectors: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    # vectors @ rotation as explicit sums: no BLAS, so the result does not depend on its threads.
    return vectors[:, :1] * rotation[0] + vectors[:, 1:2] * rotation[1] + vectors[:, 2:] * rotation[2]


def render(primitives, intrinsics, w2c, height: int, width: int, background=(1.0, 1.0, 1.0)) -> np.ndarray:
    """uint8 ``[V, H, W, 3]`` images of ``primitives`` seen by cameras ``intrinsics`` [V, 4], ``w2c`` [V, 4, 4].

    Most rays miss most primitives, so each primitive is first tested against its bounding sphere (one
    dot product per ray, the ray origin being the camera centre) and intersected exactly only on the
    rays that pass.
    """
    origins, dirs = pixel_rays(intrinsics, w2c, height, width)
    views, pixels = len(w2c), height * width
    d = dirs.reshape(-1, 3)
    view_of_ray = np.repeat(np.arange(views), pixels)
    best_t = np.full(len(d), NO_HIT)
    color = np.empty((len(d), 3))
    color[:] = background
    for prim in primitives:
        oc = origins - prim.center  # [V, 3]: ray origin relative to the primitive, per view
        # The ray o + t d meets the bounding sphere iff (d.oc)^2 >= |oc|^2 - r^2 (d unit length).
        b = np.matmul(d.reshape(views, pixels, 3), oc[:, :, None])[..., 0]
        c = (oc**2).sum(1) - _bounding_radius(prim) ** 2
        rays = np.flatnonzero(b * b >= c[:, None])
        if len(rays) == 0:
            continue
        # Intersect in the primitive's own frame: p_local = R^T (p - c), i.e. row vectors times R.
        o_loc = _rotate(oc, prim.rotation)[view_of_ray[rays]]
        d_loc = _rotate(d[rays], prim.rotation)
        t, n_loc = HITTERS[prim.kind](o_loc, d_loc, prim.size)
        hit = t < best_t[rays]
        rays, t, n_loc, o_loc, d_loc = rays[hit], t[hit], n_loc[hit], o_loc[hit], d_loc[hit]
        best_t[rays] = t
        normal = _rotate(n_loc, prim.rotation.T)
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        albedo = np.broadcast_to(prim.color, normal.shape)
        if prim.stripes:
            z_loc = o_loc[:, 2] + t * d_loc[:, 2]
            albedo = albedo * (0.65 + 0.35 * (np.sin(prim.stripes * z_loc) > 0))[:, None]
        shade = AMBIENT + (1 - AMBIENT) * np.clip(normal @ LIGHT, 0, None)
        color[rays] = albedo * shade[:, None]
    return np.round(np.clip(color, 0, 1) * 255).astype(np.uint8).reshape(views, height, width, 3)


def generate_scene(
    seed: int | Sequence[int],
    *,
    num_views: int = 32,
    height: int = 64,
    width: int = 64,
    num_primitives: tuple[int, int] = (2, 4),
    distance: float = 2.7,
    fov_deg: float = 50.0,
    background=(1.0, 1.0, 1.0),
) -> dict:
    """One procedural scene, a pure function of its arguments.

    Returns ``images`` uint8 ``[V, H, W, 3]``, ``intrinsics`` float32 ``[V, 4]`` (fx, fy, cx, cy in
    pixels), ``w2c`` float32 ``[V, 4, 4]`` (OpenCV) and ``primitives`` (list of :class:`Primitive`).
    ``num_primitives`` is an inclusive range. The images are rendered with the float32 cameras that are
    returned, so rays rebuilt from them match the pixels exactly.
    """
    rng = np.random.default_rng(seed)
    prims = random_primitives(rng, int(rng.integers(num_primitives[0], num_primitives[1] + 1)))
    # Shrink the object if its bounding sphere could leave the frame: a sphere of radius R at distance
    # d fills the half-angle asin(R / d), which must stay inside half the field of view.
    bound = max(np.linalg.norm(p.center) + _bounding_radius(p) for p in prims)
    limit = 0.95 * distance * np.sin(np.radians(fov_deg) / 2)
    if bound > limit:
        prims = [replace(p, center=p.center * limit / bound, size=p.size * limit / bound) for p in prims]
    intrinsics, w2c = random_cameras(rng, num_views, height, width, distance=distance, fov_deg=fov_deg)
    intrinsics, w2c = intrinsics.astype(np.float32), w2c.astype(np.float32)
    images = render(prims, intrinsics, w2c, height, width, background)
    return {"images": images, "intrinsics": intrinsics, "w2c": w2c, "primitives": prims}


def single_primitive_batches(count: int, seed: int, batch: int = 8, size: int = 16) -> list[dict]:
    """`count` in-memory training batches of one-primitive scenes (the colour probes: one colour per scene, so
    a model that carries the inputs' colour can be told from one that predicts grey): 4 views of size x size
    each, views 0-1 as inputs and 2-3 as targets; images [B, 2, 3, size, size] in [0, 1], intrinsics
    [B, 2, 3, 3], w2c [B, 2, 4, 4], keys "<seed>_<b>_<i>"."""
    import torch

    batches = []
    for b in range(count):
        scenes = [
            generate_scene((seed, b, i), num_views=4, height=size, width=size, num_primitives=(1, 1))
            for i in range(batch)
        ]
        images = torch.from_numpy(np.stack([s["images"] for s in scenes])).permute(0, 1, 4, 2, 3) / 255
        k = torch.from_numpy(np.stack([s["intrinsics"] for s in scenes]))
        w = torch.from_numpy(np.stack([s["w2c"] for s in scenes]))
        batches.append(
            {"input_images": images[:, :2], "input_intrinsics": k[:, :2], "input_w2c": w[:, :2],
             "target_images": images[:, 2:], "target_intrinsics": k[:, 2:], "target_w2c": w[:, 2:],
             "key": [f"{seed}_{b}_{i}" for i in range(batch)]}
        )  # fmt: skip
    return batches
