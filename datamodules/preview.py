"""Look at shards: ``python -m datamodules.preview SHARDS --out grid.png [--samples 4] [--columns 8]``.

Writes one PNG with a row per sample: the views of a scene, or the frames of a video (frames or
pixel latents). Token shards have nothing to look at; their first sample is printed decoded as bytes.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from PIL import Image

from datamodules.errors import ErrorBudget
from datamodules.readers import iter_scenes, iter_tokens, iter_videos
from datamodules.shards import expand_shards, read_tar
from datamodules.text import ByteTokenizer


def image_grid(rows: list[np.ndarray], columns: int, pad: int = 2) -> np.ndarray:
    """uint8 ``[H', W', 3]``: each entry of ``rows`` (``[N, H, W, 3]``) becomes one row of at most
    ``columns`` images, padded with white."""
    height = max(r.shape[1] for r in rows)
    width = max(r.shape[2] for r in rows)
    grid = np.full((len(rows) * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row[:columns]):
            y, x = pad + i * (height + pad), pad + j * (width + pad)
            grid[y : y + image.shape[0], x : x + image.shape[1]] = image
    return grid


def _latents_to_images(latents: np.ndarray) -> np.ndarray:
    """float16 ``[C, T, h, w]`` in [-1, 1] -> uint8 ``[T, h, w, 3]`` (first three channels, or the first as grey)."""
    x = latents.astype(np.float32)
    x = x[:3] if x.shape[0] >= 3 else np.repeat(x[:1], 3, axis=0)
    return np.clip((x + 1) * 127.5, 0, 255).round().astype(np.uint8).transpose(1, 2, 3, 0)


def preview(shards, out: str | None, samples: int = 4, columns: int = 8) -> np.ndarray | str:
    """Write (and return) the grid of the first ``samples`` scenes/videos, or the first token sample's text."""
    first = next(read_tar(expand_shards(shards)[0], ErrorBudget(0, "preview")))
    if "cameras.json" in first:
        rows = [s["images"].numpy() for s in itertools.islice(iter_scenes(shards), samples)]
    elif "frames.npy" in first:
        rows = [s["frames"].numpy() for s in itertools.islice(iter_videos(shards), samples)]
    elif "latents.npy" in first:
        videos = itertools.islice(iter_videos(shards, field="latents"), samples)
        rows = [_latents_to_images(s["latents"].numpy()) for s in videos]
    elif "tokens.npy" in first:
        sample = next(iter_tokens(shards))
        ids = sample["tokens"].tolist()
        if sample["meta"].get("tokenizer") == "bytes":
            text = ByteTokenizer().decode(ids)
        else:  # without the tokenizer file, ids are all there is to show
            text = " ".join(map(str, ids[:500]))
        print(
            f"{sample['key']}: {len(ids)} tokens, tokenizer {sample['meta'].get('tokenizer')}\n{text[:2000]}"
        )
        return text
    else:
        raise ValueError(
            f"cannot tell the format of sample {first['__key__']!r} from its fields {sorted(first)}"
        )
    grid = image_grid(rows, columns)
    if out is not None:
        Image.fromarray(grid).save(out)
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.preview", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("shards", help="a shard, brace pattern, glob or folder")
    parser.add_argument("--out", default="preview.png", help="PNG to write (default preview.png)")
    parser.add_argument("--samples", type=int, default=4, help="rows: scenes or videos (default 4)")
    parser.add_argument("--columns", type=int, default=8, help="views or frames per row (default 8)")
    args = parser.parse_args(argv)
    preview(args.shards, args.out, args.samples, args.columns)


if __name__ == "__main__":
    main()
