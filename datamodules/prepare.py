"""Write WebDataset shards: ``python -m datamodules.prepare {scenes,text,videos} --out DIR ...``.

    python -m datamodules.prepare scenes --out data/scenes/train --num-scenes 1000 --views 32 --seed 0
    python -m datamodules.prepare scenes --out data/gso --from-json ../shared/data/gso_toy --height 256 --width 256
    python -m datamodules.prepare text --out data/text --seq-len 2048 corpus/ extra.jsonl
    python -m datamodules.prepare videos --out data/videos --num-videos 500 --frames 16 --seed 0
    python -m datamodules.prepare videos --out data/latents --num-videos 500 --frames 17 --vae checkpoints/vae

Every run writes ``DIR/shard-NNNNNN.tar`` and ``DIR/meta.json`` (what was written, with the arguments).
Procedural data is a pure function of ``--seed`` (sample i of seed s is the same in any run); text has no
randomness. A folder that already holds shards is refused unless ``--overwrite`` is given, because a
reader given the folder would otherwise mix old and new shards. Everything is written into
``DIR.incomplete`` and renamed to ``DIR`` when complete (``datamodules.writers.shard_folder``), so a killed
run leaves no folder that looks finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from datamodules.camera_json import find_camera_json_scenes, load_camera_json_scene, scene_key
from datamodules.scenes import generate_scene
from datamodules.text import write_text_shards
from datamodules.videos import frames_to_latents, generate_video
from datamodules.writers import SceneWriter, VideoWriter, shard_folder


def _write_meta(out: str, tmp: str, fmt: str, writer, args: argparse.Namespace, **extra) -> dict:
    """meta.json in the folder being written (``tmp``, renamed to ``out`` when complete)."""
    if writer.count == 0:
        raise ValueError(f"nothing was written to {out}")
    meta = {
        "format": fmt,
        "samples": writer.count,
        "shards": [os.path.basename(s) for s in writer.shards],
        **extra,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    }
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {writer.count} {fmt} samples to {len(writer.shards)} shards in {out}", file=sys.stderr)
    return meta


def run_scenes(args: argparse.Namespace) -> dict:
    extra = {}
    if args.from_json:
        if (args.height is None) != (args.width is None):
            raise SystemExit("give both --height and --width (or neither, to keep the original size)")
        folders = find_camera_json_scenes(args.from_json)
        extra["source"] = os.path.abspath(args.from_json)
    else:
        args.height, args.width = args.height or 64, args.width or 64
    with (
        shard_folder(args.out, args.overwrite) as tmp,
        SceneWriter(tmp, samples_per_shard=args.samples_per_shard) as writer,
    ):
        if args.from_json:
            size = None if args.height is None else (args.height, args.width)
            for folder in tqdm(folders, desc="import scenes", unit="scene"):
                scene = load_camera_json_scene(folder, size=size)
                key = scene_key(folder, args.from_json)
                writer.write(key, scene["images"], scene["intrinsics"], scene["w2c"])
        else:
            for i in tqdm(range(args.num_scenes), desc="scenes", unit="scene"):
                scene = generate_scene(
                    [args.seed, i],
                    num_views=args.views,
                    height=args.height,
                    width=args.width,
                    num_primitives=tuple(args.primitives),
                    distance=args.distance,
                    fov_deg=args.fov,
                )
                key = f"{args.key_prefix}{args.seed}_{i:07d}"
                writer.write(key, scene["images"], scene["intrinsics"], scene["w2c"])
        writer.close()
        meta = _write_meta(args.out, tmp, "scenes", writer, args, **extra)
    return meta


def run_text(args: argparse.Namespace) -> dict:
    meta = write_text_shards(
        args.inputs,
        args.out,
        seq_len=args.seq_len,
        tokenizer=args.tokenizer,
        eod_token=args.eod_token,
        jsonl_field=args.jsonl_field,
        samples_per_shard=args.samples_per_shard,
        key_prefix=args.key_prefix,
        overwrite=args.overwrite,
        args={k: v for k, v in vars(args).items() if k != "func"},
    )
    print(
        f"wrote {meta['samples']} tokens samples to {len(meta['shards'])} shards in {args.out}",
        file=sys.stderr,
    )
    return meta


def run_videos(args: argparse.Namespace) -> dict:
    vae = None
    if args.vae is not None:
        if args.format != "frames":
            raise SystemExit("--vae stores VAE latents: do not combine it with --format pooled-pixels")
        from datamodules.vae import encode_frames, load_vae

        try:
            vae = load_vae(args.vae)
        except (FileNotFoundError, ValueError) as exn:
            raise SystemExit(str(exn)) from exn
    with (
        shard_folder(args.out, args.overwrite) as tmp,
        VideoWriter(tmp, samples_per_shard=args.samples_per_shard) as writer,
    ):
        for i in tqdm(range(args.num_videos), desc="videos", unit="video"):
            video = generate_video(
                [args.seed, i],
                num_frames=args.frames,
                height=args.height,
                width=args.width,
                num_objects=tuple(args.objects),
                radius=tuple(args.radius),
            )
            caption = None if args.no_caption else video["caption"]
            key = f"{args.key_prefix}{args.seed}_{i:07d}"
            if vae is not None:
                writer.write(key, latents=encode_frames(vae, video["frames"]), caption=caption)
            elif args.format == "pooled-pixels":
                writer.write(
                    key, latents=frames_to_latents(video["frames"], args.latent_downsample), caption=caption
                )
            else:
                writer.write(key, frames=video["frames"], caption=caption)
        writer.close()
        field = "frames" if vae is None and args.format == "frames" else "latents"
        extra = {"vae": type(vae).__name__} if vae is not None else {}
        meta = _write_meta(args.out, tmp, "videos", writer, args, field=field, **extra)
    return meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.prepare", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, key_prefix: str) -> None:
        p.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar and meta.json")
        p.add_argument(
            "--samples-per-shard", type=int, default=100, help="samples per tar shard (default 100)"
        )
        p.add_argument("--key-prefix", default=key_prefix, help=f"sample key prefix (default {key_prefix!r})")
        p.add_argument("--overwrite", action="store_true", help="delete the folder's existing shards first")

    p = sub.add_parser(
        "scenes", help="procedural scenes, or scenes imported from opencv_cameras.json folders"
    )
    common(p, "scene_s")
    p.add_argument(
        "--from-json", metavar="DIR", help="import: a folder with opencv_cameras.json, or folders below it"
    )
    p.add_argument("--num-scenes", type=int, default=100, help="procedural scenes to generate (default 100)")
    p.add_argument("--views", type=int, default=32, help="cameras per procedural scene (default 32)")
    p.add_argument("--height", type=int, help="image height (procedural default 64; import: resize+crop)")
    p.add_argument("--width", type=int, help="image width (procedural default 64; import: resize+crop)")
    p.add_argument(
        "--seed", type=int, default=0, help="procedural scenes: scene i of seed s is always the same"
    )
    p.add_argument("--primitives", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"))
    p.add_argument(
        "--distance", type=float, default=2.7, help="camera distance from the origin (default 2.7)"
    )
    p.add_argument(
        "--fov", type=float, default=50.0, help="field of view across the shorter side, degrees (default 50)"
    )
    p.set_defaults(func=run_scenes)

    p = sub.add_parser("text", help="text/JSONL files or folders -> packed token sequences")
    common(p, "seq")
    p.add_argument(
        "inputs", nargs="+", help=".txt files (one document each), .jsonl files (one per line), folders"
    )
    p.add_argument(
        "--seq-len", type=int, required=True, help="tokens per training sequence; stored as seq_len + 1"
    )
    p.add_argument(
        "--tokenizer", default="bytes", help="'bytes' (default) or the path of a local tokenizer.json"
    )
    p.add_argument("--eod-token", help="end-of-document token of a tokenizer.json (default: a common one)")
    p.add_argument("--jsonl-field", default="text", help="JSONL field holding the text (default 'text')")
    p.set_defaults(func=run_text)

    p = sub.add_parser("videos", help="procedural videos of moving shapes")
    common(p, "video_s")
    p.add_argument("--num-videos", type=int, default=100, help="videos to generate (default 100)")
    p.add_argument("--frames", type=int, default=16, help="frames per video (default 16)")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="video i of seed s is always the same")
    p.add_argument("--objects", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"))
    p.add_argument(
        "--radius",
        type=float,
        nargs=2,
        default=(0.09, 0.18),
        metavar=("LO", "HI"),
        help="range of shape radii in units of the frame's short side (default 0.09 0.18)",
    )
    p.add_argument(
        "--format",
        choices=("frames", "pooled-pixels"),
        default="frames",
        help="frames: uint8 [T,H,W,3]; pooled-pixels: no VAE, the latents field holds float16 [3,T,H/f,W/f] "
        "average-pooled pixels in [-1,1]",
    )
    p.add_argument(
        "--latent-downsample",
        type=int,
        default=1,
        help="f: average-pooling factor for --format pooled-pixels",
    )
    p.add_argument(
        "--vae",
        metavar="DIR",
        help="a local diffusers VAE folder (AutoencoderKL or AutoencoderKLWan): store its normalised latents "
        "float16 [C,t,h,w] in the latents field",
    )
    p.add_argument("--no-caption", action="store_true", help="do not store caption.txt")
    p.set_defaults(func=run_videos)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exn:  # user error: a message, no traceback
        raise SystemExit(f"prepare {args.command}: {exn}") from exn


if __name__ == "__main__":
    main()
