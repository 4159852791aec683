"""Procedural videos: any T, H, W; deterministic; motion that leaves the frame, comes back and occludes."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules import prepare
from datamodules.readers import iter_videos
from datamodules.videos import COLORS, MOTIONS, frames_to_latents, generate_video


@pytest.mark.parametrize("t,h,w", [(1, 8, 8), (16, 64, 64), (9, 24, 40), (5, 40, 24)])
def test_any_size(t, h, w):
    video = generate_video(0, num_frames=t, height=h, width=w)
    assert video["frames"].shape == (t, h, w, 3) and video["frames"].dtype == np.uint8
    assert video["tracks"].shape[1:] == (t, 2)


def test_deterministic_per_seed():
    a, b, c = (generate_video(s, num_frames=8) for s in (4, 4, 5))
    assert np.array_equal(a["frames"], b["frames"]) and a["caption"] == b["caption"]
    assert not np.array_equal(a["frames"], c["frames"])


def test_frames_change_smoothly():
    frames = generate_video(1, num_frames=24)["frames"].astype(np.int16)
    steps = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    assert (steps > 0).mean() > 0.9, "something moves in (almost) every frame"
    tracks = generate_video(1, num_frames=24)["tracks"]
    speed = np.linalg.norm(np.diff(tracks, axis=1), axis=-1)
    assert speed.max() < 0.1, "no jumps: at most a tenth of the frame per step"


def test_shapes_leave_the_frame_and_come_back_and_occlude():
    left_and_returned = occluded = 0
    for seed in range(20):
        video = generate_video(seed, num_frames=48, height=8, width=8)  # tracks do not depend on the size
        tracks, radii, extent = video["tracks"], video["radii"], video["extent"]
        for k in range(len(radii)):
            outside = ((tracks[k] < -radii[k]) | (tracks[k] > extent + radii[k])).any(-1)  # fully out of view
            if outside.any() and not outside[0]:
                first_out = np.argmax(outside)
                left_and_returned += (~outside[first_out:]).any()
        for i in range(len(radii)):
            for j in range(i + 1, len(radii)):
                gap = np.linalg.norm(tracks[i] - tracks[j], axis=-1)
                occluded += (gap < 0.5 * (radii[i] + radii[j])).any()
    assert left_and_returned >= 3 and occluded >= 3


def test_latents_are_pooled_pixels():
    frames = generate_video(2, num_frames=3, height=8, width=12)["frames"]
    latents = frames_to_latents(frames, downsample=4)
    assert latents.shape == (3, 3, 2, 3) and latents.dtype == np.float16
    block = frames[1, 4:8, 8:12, 0].astype(np.float32) / 127.5 - 1
    assert latents[0, 1, 1, 2] == np.float16(block.mean())
    with pytest.raises(ValueError, match="not divisible"):
        frames_to_latents(frames, downsample=5)


@pytest.mark.parametrize("fmt", ["frames", "latents"])
def test_prepare_videos_round_trip(tmp_path, fmt):
    args = [
        "videos",
        "--out",
        str(tmp_path),
        "--num-videos",
        "3",
        "--frames",
        "5",
        "--height",
        "16",
        "--width",
        "24",
    ]
    fmt_option = {"frames": "frames", "latents": "pooled-pixels"}[fmt]  # the no-VAE latents option
    args += ["--format", fmt_option, "--latent-downsample", "2", "--seed", "3", "--samples-per-shard", "2"]
    meta = prepare.main(args)
    assert meta["samples"] == 3 and meta["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    samples = list(iter_videos(tmp_path, field=fmt))
    for i, sample in enumerate(samples):
        video = generate_video([3, i], num_frames=5, height=16, width=24)
        want = video["frames"] if fmt == "frames" else frames_to_latents(video["frames"], 2)
        assert np.array_equal(sample[fmt].numpy(), want)
        assert sample["caption"] == video["caption"] and sample["key"] == f"video_s3_{i:07d}"


def test_wrap_motion_reenters_after_a_gap_with_a_colour_seen_only_before():
    gaps = []
    for seed in range(10):
        video = generate_video(
            seed, num_frames=24, height=16, width=16, num_objects=(1, 1), motions=("wrap",), colors="random"
        )
        track, radius, extent = video["tracks"][0], video["radii"][0], video["extent"]
        outside = (track < -radius) | (track > extent + radius)
        out = outside.any(-1)
        # runs of frames fully out of view that end with the shape back in view
        run = 0
        for t in range(1, 24):
            run = run + 1 if out[t] else run
            if not out[t] and out[t - 1]:
                gaps.append(run)
                run = 0
        assert video["shapes"] and video["motions"] == ["wrap"]
        colour = tuple(int(c) for c in video["caption"].split("rgb(")[1].split(")")[0].split(","))
        visible = video["frames"].reshape(-1, 3)
        assert (visible == colour).all(-1).any(), "the shape is drawn in its random colour"
        assert colour not in COLORS.values()
    assert len(gaps) >= 10 and min(gaps) >= 2 and max(gaps) <= 9, gaps


def test_default_clips_unchanged_by_the_options_and_bad_options_named():
    a = generate_video(3, num_frames=6, height=16, width=16)
    b = generate_video(3, num_frames=6, height=16, width=16, motions=MOTIONS, colors="palette")
    assert np.array_equal(a["frames"], b["frames"]) and a["caption"] == b["caption"]
    with pytest.raises(ValueError, match="motions"):
        generate_video(0, motions=("teleport",))
    with pytest.raises(ValueError, match="colors"):
        generate_video(0, colors="pastel")
    c = generate_video(3, num_frames=6, height=16, width=16, radius=(0.09, 0.18))
    assert np.array_equal(a["frames"], c["frames"])
    with pytest.raises(ValueError, match="radius"):
        generate_video(0, radius=(0.3, 0.1))


def test_radius_range_sets_the_shape_sizes():
    small, large = [], []
    for seed in range(8):
        for radii, sizes in (((0.05, 0.08), small), ((0.3, 0.35), large)):
            video = generate_video(seed, num_frames=2, height=32, width=32, radius=radii)
            assert ((video["radii"] >= radii[0]) & (video["radii"] <= radii[1])).all()
            sizes.append(video["radii"])
    assert np.concatenate(large).min() > np.concatenate(small).max()


def test_prepare_videos_passes_the_radius_range_and_names_a_bad_one(tmp_path):
    args = ["videos", "--num-videos", "2", "--frames", "3", "--height", "16", "--width", "16", "--seed", "5"]
    prepare.main([*args, "--out", str(tmp_path / "big"), "--radius", "0.25", "0.3"])
    samples = list(iter_videos(tmp_path / "big", field="frames"))
    assert len(samples) == 2
    for i, sample in enumerate(samples):
        want = generate_video([5, i], num_frames=3, height=16, width=16, radius=(0.25, 0.3))["frames"]
        assert np.array_equal(sample["frames"].numpy(), want)
        default = generate_video([5, i], num_frames=3, height=16, width=16)["frames"]
        assert not np.array_equal(want, default)
    with pytest.raises(SystemExit, match="radius"):
        prepare.main([*args, "--out", str(tmp_path / "bad"), "--radius", "0.3", "0.1"])
    assert not list((tmp_path / "bad").glob("*.tar"))  # no half-written shards left behind
