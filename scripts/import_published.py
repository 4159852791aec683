"""Convert a released LaCT checkpoint (github.com/a1600012888/LaCT) into a checkpoint of this suite.

    python scripts/import_published.py nvs weight/obj_res256.pt --out outputs/nvs/obj256
    python scripts/import_published.py lm  lact_760m/pytorch_model.bin --out outputs/lm/760m_published
    python train.py predict --config configs/nvs/paper.yaml --config configs/nvs/paper_24l_2x.yaml \
        --ckpt_path outputs/nvs/obj256/published.ckpt ...

nvs: the file the published lact_nvs/train.py saves ({"model": state_dict, ...}) or a bare state dict of
`LaCTLVSM`; lm: a state dict of `LaCTForCausalLM` (torch format). Names and layouts are mapped by
lact/published.py. The suite config is given as one or more --config files, merged in order as train.py
merges them (a base and its overlays), or else is the paper config whose architecture the weights' shapes
match (configs/nvs/paper.yaml + paper_14l.yaml, paper_24l_2x.yaml or paper_24l.yaml; configs/lm/760m.yaml
or 760m.yaml + 3b.yaml). Settings the weights do not determine (e.g. Muon steps) come from that config: pass train.py
the same --config files, since its checkpoint check compares every network field.

Writes DIR/published.ckpt: a Lightning checkpoint with the converted weights under the module's network
prefix (`net.`), the module's hyper_parameters as TaskModule saves them (`net`: the network config complete,
`optim`: the optimisation config complete, the module's other init args) and empty optimizer/scheduler
states, so `fit --ckpt_path` starts from the released weights with a fresh optimizer at step 0, and `test` /
`predict --ckpt_path` load them. Loads with torch.load(weights_only=True). Refuses, naming them, when keys are
missing, unexpected or of the wrong shape.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lact.published import strip_wrappers, to_ours  # noqa: E402

# Every TaskModule keeps its network as `self.net` (state-dict prefix "net.") and takes its config as the
# init argument `net`, the optimisation settings as `optim` (modules/task.py).
NET_PREFIX = "net."
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


def default_config(kind: str, state: dict) -> list[Path]:
    """The paper config (base and overlay for NVS) matching the weights' shapes (published names)."""
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
    base = {"nvs": "paper.yaml", "lm": "760m.yaml"}[kind]  # the other sizes are overlays on it
    return [ROOT / "configs" / kind / n for n in dict.fromkeys([base, name])]


def merge(base: dict, overlay: dict) -> dict:
    """`overlay` on `base`, mappings merged key by key at every depth, anything else replaced (how train.py's
    second --config overrides the first)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_configs(paths: list[Path]) -> dict:
    merged = {}
    for path in paths:
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise SystemExit(f"{path}: no such config file") from None
        if not isinstance(raw, dict):
            raise SystemExit(f"{path}: expected a YAML mapping (a train.py config)")
        merged = merge(merged, raw)
    return merged


def module_hparams(class_path: str, init_args: dict, net_config) -> dict:
    """The hyper_parameters TaskModule would save for these init args: every init argument of the module class
    (defaults filled in), `net` and `optim` as plain dicts of their complete dataclasses."""
    import importlib

    from modules.task import OptimConfig, as_config

    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise SystemExit(f"model.class_path {class_path!r}: no such module class") from None
    hparams = {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }
    hparams |= init_args
    hparams["net"] = asdict(net_config)
    hparams["optim"] = asdict(as_config(OptimConfig, init_args.get("optim")))
    return {"_class_path": class_path, **hparams}


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


def convert(kind: str, state: dict, config_paths: list[Path]) -> dict:
    """Published state dict + suite config (files merged in order) -> the Lightning checkpoint dict.
    SystemExit on any key mismatch."""
    raw = read_configs(config_paths)
    config_path = " + ".join(str(p) for p in config_paths)
    try:
        model_spec = raw["model"]
        init_args = dict(model_spec["init_args"])
        spec = init_args["net"]
    except (KeyError, TypeError):
        raise SystemExit(
            f"{config_path}: expected model.init_args.net (a {kind} config of this suite)"
        ) from None
    try:
        cfg, net = build_network(kind, spec)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"{config_path}: model.init_args.net: {error}") from None
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
    import lightning

    return {
        "state_dict": {NET_PREFIX + k: v.contiguous() for k, v in ours.items()},
        "hyper_parameters": module_hparams(model_spec.get("class_path", MODULE_CLASS[kind]), init_args, cfg),
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "loops": None,  # no loop state: fit starts at step 0
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
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        default=None,
        help="suite config of the architecture; repeat for a base and its overlays (merged in order)",
    )
    args = parser.parse_args(argv)
    state = load_published(args.checkpoint)
    config = args.config or default_config(args.kind, state)
    ckpt = convert(args.kind, state, config)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / OUTPUT_NAME
    torch.save(ckpt, out)
    names = " + ".join(str(p) for p in config)
    print(f"{out}: {len(ckpt['state_dict'])} tensors from {args.checkpoint}, config {names}")
    return out


if __name__ == "__main__":
    main()
