"""The `python -m datamodules.prepare` command: help, determinism, overwrite protection, previews."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datamodules import prepare, preview
from datamodules.readers import iter_scenes
from datamodules.scenes import generate_scene

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", ["scenes", "text", "videos"])
def test_help_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"prepare {command}" in out and "--out" in out and "--samples-per-shard" in out


def test_module_runs_as_a_command():
    out = subprocess.run(
        [sys.executable, "-m", "datamodules.prepare", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "{scenes,text,videos}" in out.stdout


def test_prepare_scenes_is_deterministic_and_matches_the_generator(tmp_path):
    args = [
        "scenes",
        "--num-scenes",
        "3",
        "--views",
        "4",
        "--height",
        "16",
        "--width",
        "16",
        "--seed",
        "11",
        "--samples-per-shard",
        "2",
    ]
    meta = prepare.main([*args, "--out", str(tmp_path / "a")])
    prepare.main([*args, "--out", str(tmp_path / "b")])
    assert (
        meta["shards"]
        == sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
        == ["shard-000000.tar", "shard-000001.tar"]
    )
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["samples"] == 3
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    samples = list(iter_scenes(tmp_path / "a", num_views=4, image_size=(16, 16)))
    assert [s["key"] for s in samples] == [f"scene_s11_{i:07d}" for i in range(3)]
    want = generate_scene([11, 2], num_views=4, height=16, width=16)
    assert np.array_equal(samples[2]["images"].numpy(), want["images"])
    assert np.array_equal(samples[2]["w2c"].numpy(), want["w2c"])


def test_prepare_refuses_to_mix_old_and_new_shards(tmp_path):
    args = [
        "videos",
        "--out",
        str(tmp_path),
        "--num-videos",
        "3",
        "--frames",
        "2",
        "--height",
        "8",
        "--width",
        "8",
    ]
    prepare.main([*args, "--samples-per-shard", "1"])
    with pytest.raises(SystemExit, match="already holds 3 shards"):
        prepare.main(args)
    prepare.main([*args, "--samples-per-shard", "2", "--overwrite"])
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]


def test_preview_grid_of_scenes(tmp_path):
    prepare.main(
        [
            "scenes",
            "--out",
            str(tmp_path),
            "--num-scenes",
            "2",
            "--views",
            "5",
            "--height",
            "12",
            "--width",
            "10",
        ]
    )
    grid = preview.preview(tmp_path, str(tmp_path / "grid.png"), samples=2, columns=4)
    assert grid.shape == (2 * 14 + 2, 4 * 12 + 2, 3) and (tmp_path / "grid.png").is_file()
    first = next(iter_scenes(tmp_path))["images"].numpy()
    assert np.array_equal(grid[2:14, 2:12], first[0]) and np.array_equal(grid[2:14, 14:24], first[1])
