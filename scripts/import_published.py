"""Convert a released LaCT checkpoint (github.com/a1600012888/LaCT) into a checkpoint of this suite.

    python scripts/import_published.py nvs weight/obj_res256.pt --out runs/obj256
    python scripts/import_published.py lm  lact_760m/pytorch_model.bin --out runs/lm760m
    python train.py predict --config configs/nvs/paper_24l_2x.yaml --ckpt_path runs/obj256/published.ckpt ...

nvs: the file the published lact_nvs/train.py saves ({"model": state_dict, ...}) or a bare state dict of
`LaCTLVSM`; lm: a state dict of `LaCTForCausalLM` (torch format). Names and layouts are mapped by
lact/published.py. The suite config is --config, or else the paper config whose architecture the weights'
shapes match (configs/nvs/paper_14l.yaml, paper_24l_2x.yaml, paper_24l.yaml; configs/lm/760m.yaml, 3b.yaml).
Settings the weights do not determine (e.g. Muon steps) come from that config.

Writes DIR/published.ckpt: a Lightning checkpoint with the converted weights under the module's network
prefix, the module's hyper_parameters (the config's model init_args, network config complete) and empty
optimizer/scheduler states, so `fit --ckpt_path` starts from the released weights with a fresh optimizer at
step 0. Loads with torch.load(weights_only=True). Refuses, naming them, when keys are missing, unexpected or
of the wrong shape.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lact.published import strip_wrappers, to_ours  # noqa: E402

# Where each module keeps its network (its state-dict prefix) and under which init argument its config is.
# One place to change when the modules rename their network attribute.
NET_PREFIX = {"nvs": "net.", "lm": "model."}
NET_CONFIG_ARG = {"nvs": "model", "lm": "config"}
MODULE_CLASS = {"nvs": "modules.nvs.NVSModule", "lm": "modules.lm.LMModule"}
OUTPUT_NAME = "published.ckpt"


def build_network(kind: str, spec: dict):
    """The network config dataclass and the network on the meta device (shapes only, no memory)."""
    if kind == "nvs":
        from lact.models.nvs import NVSConfig, NVSNet

        cfg = NVSConfig(**spec)
        with torch.device("meta"):
            return cfg, NVSNet(cfg)
    from lact.models.lm import LaCTLM, LMConfig

    cfg = LMConfig(**spec)
    with torch.device("meta"):
        return cfg, LaCTLM(cfg)


def default_config(kind: str, state: dict) -> Path:
    """The paper config matching the weights' shapes (published names)."""
    if kind == "nvs":
        layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        w0 = state.get("blocks.0.module_list.1.f.w0")
        multi = None if w0 is None else w0.shape[2] // w0.shape[1]
        known = {(14, 2): "paper_14l.yaml", (24, 2): "paper_24l_2x.yaml", (24, 4): "paper_24l.yaml"}
        name, what = known.get((layers, multi)), f"{layers} blocks, fast-weight hidden {multi}x"
    else:
        emb = state.get("model.embeddings.weight")
        dim = None if emb is None else emb.shape[1]
        name, what = {1536: "760m.yaml", 3072: "3b.yaml"}.get(dim), f"hidden size {dim}"
    if name is None:
        raise SystemExit(
            f"no paper config of this suite has the checkpoint's architecture ({what}): pass --config"
        )
    return ROOT / "configs" / kind / name


def load_published(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file") from None
    except Exception as error:  # pickle errors: anything weights_only refuses
        raise SystemExit(
            f"{path}: not a plain tensor checkpoint (torch.load weights_only=True: {error})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # what the published lact_nvs/train.py saves
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SystemExit(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return strip_wrappers(obj)


def convert(kind: str, state: dict, config_path: Path) -> dict:
    """Published state dict + suite config -> the Lightning checkpoint dict. SystemExit on any key mismatch."""
    raw = yaml.safe_load(config_path.read_text())
    try:
        model_spec = raw["model"]
        init_args = dict(model_spec["init_args"])
        spec = init_args[NET_CONFIG_ARG[kind]]
    except (KeyError, TypeError):
        raise SystemExit(
            f"{config_path}: expected model.init_args.{NET_CONFIG_ARG[kind]} (a {kind} config of this suite)"
        ) from None
    cfg, net = build_network(kind, spec)
    ours, leftover = to_ours(kind, state)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(leftover) + sorted(k + " (converted)" for k in set(ours) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(v.shape)} != {expected[k]}"
        for k, v in ours.items()
        if k in expected and v.shape != expected[k]
    )
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
            problems.append(f"{title} keys: {shown}")
    if problems:
        raise SystemExit(
            f"the checkpoint does not match {config_path} ({kind}): " + "; ".join(problems)
            + ". Missing/unexpected names are given in this suite's names for missing ones and the checkpoint's"
            " for unexpected ones; pass the --config of the checkpoint's architecture."
        )  # fmt: skip
    init_args[NET_CONFIG_ARG[kind]] = asdict(cfg)
    import lightning

    return {
        "state_dict": {NET_PREFIX[kind] + k: v.contiguous() for k, v in ours.items()},
        "hyper_parameters": {"_class_path": model_spec.get("class_path", MODULE_CLASS[kind]), **init_args},
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "optimizer_states": [],  # fit starts a fresh optimizer and schedule from the released weights
        "lr_schedulers": [],
        "callbacks": {},
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=("nvs", "lm"))
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--config", type=Path, default=None, help="suite config of the architecture")
    args = parser.parse_args(argv)
    state = load_published(args.checkpoint)
    config = args.config or default_config(args.kind, state)
    ckpt = convert(args.kind, state, config)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / OUTPUT_NAME
    torch.save(ckpt, out)
    print(f"{out}: {len(ckpt['state_dict'])} tensors from {args.checkpoint}, config {config}")
    return out


if __name__ == "__main__":
    main()
