"""scripts/import_published.py and lact/published.py on synthetic state dicts with the published names and
shapes (written below from the published model code: lact_nvs/model.py + lact_ttt.py, lact_llm
modeling_lact.py + layer_lact_swiglu.py), round trip included."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import yaml

from lact.published import to_ours, to_published
from modules.lm import LMModule
from modules.nvs import NVSModule

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_published", ROOT / "scripts" / "import_published.py")
importer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(importer)

NVS_LACT = dict(
    heads=1, inter_multi=2.0, base_lr=0.01, muon="fixed", output_gate=None, init_gain=math.sqrt(2)
)
NVS_NET = dict(
    patch_size=2, dim=32, num_layers=2, num_heads=2, lact=NVS_LACT, mlp="gelu", norm_bias=False,
    output_bias=None, mlp_ratio=4.0,
)  # fmt: skip
LM_LACT = dict(
    heads=2, chunk_size=8, base_lr=1e-3, momentum=True, rotary=True, rotary_dim=8, low_rank=4, qk_affine=True,
    output_gate_bias=True,
)  # fmt: skip
LM_NET = dict(
    vocab_size=50, dim=32, num_layers=2, num_heads=4, lact=LM_LACT, window=8, tie_embeddings=False,
    rope_base=1e6, norm_eps=1e-6, mlp_hidden=96,
)  # fmt: skip


def randn(g, *shape):
    return torch.randn(*shape, generator=g)


def published_nvs_state(layers=2, dim=32, p=2, inter=2, head_dim=16, seed=0) -> dict:
    """LaCTLVSM(patch_size=p, dim, layers, block_config=[SelfAttention(head_dim), FastWeightGluMLPMultihead(
    head_dim=dim, inter_multi), MLP(4)]) with bias=False: its parameter names and shapes."""
    g, dh = torch.Generator().manual_seed(seed), dim * inter
    sd = {"input_linear.weight": randn(g, dim, 12 * p * p), "input_layernorm.weight": randn(g, dim)}
    for i in range(layers):
        b = f"blocks.{i}.module_list."
        sd |= {
            b + "0.ln.weight": randn(g, dim),
            b + "0.f.to_qkv.weight": randn(g, 3 * dim, dim),
            b + "0.f.c_proj.weight": randn(g, dim, dim),
            b + "0.f.q_norm.weight": randn(g, head_dim),
            b + "0.f.k_norm.weight": randn(g, head_dim),
            b + "1.ln.weight": randn(g, dim),
            b + "1.f.w0": randn(g, 1, dim, dh),
            b + "1.f.w1": randn(g, 1, dh, dim),
            b + "1.f.w2": randn(g, 1, dim, dh),
            b + "1.f.to_qkv.weight": randn(g, 3 * dim, dim),
            b + "1.f.c_proj.weight": randn(g, dim, dim),
            b + "1.f.lr_fc.weight": randn(g, 3, dim),
            b + "1.f.lr_fc.bias": randn(g, 3),
            b + "1.f.o_norm.weight": randn(g, dim),
            b + "2.ln.weight": randn(g, dim),
            b + "2.f.c_fc.weight": randn(g, 4 * dim, dim),
            b + "2.f.c_proj.weight": randn(g, dim, 4 * dim),
        }
    sd |= {
        "image_token_decoder.0.weight": randn(g, dim),
        "image_token_decoder.1.weight": randn(g, 3 * p * p, dim),
    }
    return sd


def published_lm_state(layers=2, dim=32, heads=2, rank=4, vocab=50, mlp=96, seed=0) -> dict:
    """LaCTForCausalLM with attn_qk_norm false, w0_w2_low_rank=rank, learnable_ttt_scale, use_momentum, untied."""
    g, d = torch.Generator().manual_seed(seed), dim // heads
    sd = {"model.embeddings.weight": randn(g, vocab, dim)}
    for i in range(layers):
        b = f"model.layers.{i}."
        sd |= {
            b + "attn_norm.weight": randn(g, dim),
            b + "attn.qkv.weight": randn(g, 3 * dim, dim),
            b + "attn.o_proj.weight": randn(g, dim, dim),
            b + "attn.w0.w_left": randn(g, heads, d, rank),
            b + "attn.w0.w_right": randn(g, heads, rank, d),
            b + "attn.w2.w_left": randn(g, heads, d, rank),
            b + "attn.w2.w_right": randn(g, heads, rank, d),
            b + "attn.w1": randn(g, heads, d, d),
            b + "attn.lr_proj.weight": randn(g, 3 * heads, dim),
            b + "attn.lr_proj.bias": randn(g, 3 * heads),
            b + "attn.qk_scale": randn(g, dim, 2),
            b + "attn.qk_offset": randn(g, dim, 2),
            b + "attn.ttt_scale_proj.weight": randn(g, heads, dim),
            b + "attn.ttt_scale_proj.bias": randn(g, heads),
            b + "attn.ttt_norm.weight": randn(g, d),
            b + "attn.momentum_proj.0.weight": randn(g, heads, dim),
            b + "attn.momentum_proj.0.bias": randn(g, heads),
            b + "mlp_norm.weight": randn(g, dim),
            b + "mlp.gate_proj.weight": randn(g, mlp, dim),
            b + "mlp.up_proj.weight": randn(g, mlp, dim),
            b + "mlp.down_proj.weight": randn(g, dim, mlp),
        }
    sd |= {"model.norm.weight": randn(g, dim), "lm_head.weight": randn(g, vocab, dim)}
    return sd


def write_config(tmp_path: Path, kind: str) -> Path:
    net = {"nvs": NVS_NET, "lm": LM_NET}[kind]
    cls = {"nvs": "modules.nvs.NVSModule", "lm": "modules.lm.LMModule"}[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_text(
        yaml.safe_dump({"model": {"class_path": cls, "init_args": {"net": net, "optim": {"lr": 1e-3}}}})
    )
    return path


@pytest.mark.parametrize("kind", ["nvs", "lm"])
def test_round_trip_is_exact(kind):
    state = {"nvs": published_nvs_state, "lm": published_lm_state}[kind]()
    ours, leftover = to_ours(kind, state)
    assert leftover == []
    back, rest = to_published(kind, ours)
    assert rest == [] and set(back) == set(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key


def test_layouts_follow_the_published_code():
    nvs = published_nvs_state()
    ours, _ = to_ours("nvs", nvs)
    w0 = nvs["blocks.0.module_list.1.f.w0"]
    assert torch.equal(ours["blocks.0.lact.w_gate"], w0.mT)  # [H, d, h] -> [H, h, d]
    lr = nvs["blocks.1.module_list.1.f.lr_fc.weight"]  # published rows: gate, down, up
    assert torch.equal(ours["blocks.1.lact.lr_proj.weight"], lr[[0, 2, 1]])  # ours: gate, up, down
    # a patch feature (p_row, p_col, channel) of the published input Linear is our (channel, p_row, p_col)
    w_in, p = nvs["input_linear.weight"], 2
    assert torch.equal(ours["embed.weight"][:, 7 * p * p + 1 * p + 0], w_in[:, (1 * p + 0) * 12 + 7])
    w_out = nvs["image_token_decoder.1.weight"]
    assert torch.equal(ours["out.weight"][2 * p * p + 0 * p + 1], w_out[(0 * p + 1) * 3 + 2])
    lm = published_lm_state(heads=2)
    ours, _ = to_ours("lm", lm)
    lr = lm["model.layers.0.attn.lr_proj.weight"]  # head-major: row = head * 3 + (gate, down, up)
    mine = ours["blocks.0.lact.lr_proj.weight"]  # matrix-major: row = (gate, up, down) * heads + head
    for head in range(2):
        assert torch.equal(mine[0 * 2 + head], lr[head * 3 + 0])
        assert torch.equal(mine[1 * 2 + head], lr[head * 3 + 2])
        assert torch.equal(mine[2 * 2 + head], lr[head * 3 + 1])
    assert torch.equal(ours["blocks.0.lact.qk_scale"], lm["model.layers.0.attn.qk_scale"].T)
    gate_up = ours["blocks.1.mlp.gate_up.weight"]
    assert torch.equal(
        gate_up,
        torch.cat([lm["model.layers.1.mlp.gate_proj.weight"], lm["model.layers.1.mlp.up_proj.weight"]]),
    )


@pytest.mark.parametrize("kind", ["nvs", "lm"])
def test_import_writes_a_loadable_lightning_checkpoint(tmp_path, kind):
    state = {"nvs": published_nvs_state, "lm": published_lm_state}[kind]()
    torch.save({"model": state, "optimizer": {}} if kind == "nvs" else state, tmp_path / "released.pt")
    out = importer.main(
        [
            kind,
            str(tmp_path / "released.pt"),
            "--out",
            str(tmp_path / "out"),
            "--config",
            str(write_config(tmp_path, kind)),
        ]
    )
    ckpt = torch.load(out, weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["_class_path"] == {"nvs": "modules.nvs.NVSModule", "lm": "modules.lm.LMModule"}[kind]
    module = (NVSModule if kind == "nvs" else LMModule)(
        **{k: v for k, v in hp.items() if not k.startswith("_")}
    )
    module.load_state_dict(ckpt["state_dict"], strict=True)  # what Trainer does with --ckpt_path
    net = module.net
    ours, _ = to_ours(kind, state)
    for key, value in net.state_dict().items():
        assert torch.equal(value, ours[key]), key
    # back to the published names, equal to the file we started from
    back, rest = to_published(
        kind, {k.removeprefix(importer.NET_PREFIX): v for k, v in ckpt["state_dict"].items()}
    )
    assert rest == [] and all(torch.equal(back[k], state[k]) for k in state)
    assert ckpt["optimizer_states"] == [] and ckpt["global_step"] == 0


def test_import_refuses_naming_missing_and_unexpected_keys(tmp_path):
    state = published_nvs_state()
    del state["blocks.1.module_list.1.f.lr_fc.bias"]
    state["blocks.0.module_list.1.f.gate_proj.weight"] = torch.zeros(1, 32)
    torch.save(state, tmp_path / "bad.pt")
    config = str(write_config(tmp_path, "nvs"))
    with pytest.raises(
        SystemExit,
        match=r"missing keys: blocks\.1\.lact\.lr_proj\.bias.*unexpected keys: blocks\.0\.module_list\.1\.f\.gate_proj\.weight",
    ):
        importer.main(["nvs", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "o"), "--config", config])
    state = published_nvs_state(inter=4)  # a 4x checkpoint against a 2x config
    torch.save(state, tmp_path / "wide.pt")
    with pytest.raises(SystemExit, match=r"wrong shape keys: blocks\.0\.lact\.w_down"):
        importer.main(["nvs", str(tmp_path / "wide.pt"), "--out", str(tmp_path / "o"), "--config", config])
    with pytest.raises(SystemExit, match="no paper config .* pass --config"):
        importer.main(["nvs", str(tmp_path / "wide.pt"), "--out", str(tmp_path / "o")])


def test_default_config_is_chosen_from_the_shapes():
    names = [p.name for p in importer.default_config("nvs", published_nvs_state(layers=14, inter=2))]
    assert names == ["paper.yaml", "paper_14l.yaml"]
    names = [p.name for p in importer.default_config("nvs", published_nvs_state(layers=24, inter=4))]
    assert names == ["paper.yaml", "paper_24l.yaml"]
    names = [p.name for p in importer.default_config("nvs", published_nvs_state(layers=24, inter=2))]
    assert names == ["paper.yaml", "paper_24l_2x.yaml"]
    lm = {"model.embeddings.weight": torch.zeros(32000, 1536)}
    assert [p.name for p in importer.default_config("lm", lm)] == ["760m.yaml"]


# ----------------------------------------------------------------------------------------------------------
# End to end: a synthetic released checkpoint of a tiny published-layout model, imported with a base config
# and an overlay, then loaded by train.py (its checkpoint check, the hyperparameters, the weights).

LM_OVERLAY = {  # configs/lm/tiny.yaml (D 128, 4 attention heads, 2 LaCT heads) with the published options
    "model": {
        "init_args": {
            "net": {
                "tie_embeddings": False,
                "lact": {"low_rank": 4, "qk_affine": True, "output_gate_bias": True, "rotary_dim": 32},
            }
        }
    }
}
NVS_OVERLAY = {  # configs/nvs/tiny.yaml (patch 4, D 32, 2 blocks, one LaCT head 2x) as the published model
    "model": {
        "init_args": {
            "net": {
                "mlp": "gelu", "mlp_ratio": 4.0, "norm_bias": False, "output_bias": None,
                "lact": {"muon": "fixed", "output_gate": None, "init_gain": math.sqrt(2)},
            },
            "lpips_weight": 0.0,
            "lpips_metric": False,
        }
    }
}  # fmt: skip


def import_tiny(tmp_path: Path, kind: str) -> tuple[Path, Path, dict]:
    """(imported checkpoint, overlay config, the published state dict) for configs/<kind>/tiny.yaml + overlay."""
    overlay = tmp_path / f"{kind}_published.yaml"
    overlay.write_text(yaml.safe_dump(LM_OVERLAY if kind == "lm" else NVS_OVERLAY))
    if kind == "lm":
        state = published_lm_state(layers=2, dim=128, heads=2, rank=4, vocab=257, mlp=384)
    else:
        state = published_nvs_state(layers=2, dim=32, p=4, inter=2, head_dim=16)
    torch.save(state, tmp_path / "released.pt")
    tiny = str(ROOT / "configs" / kind / "tiny.yaml")
    args = [kind, str(tmp_path / "released.pt"), "--out", str(tmp_path / "imported")]
    out = importer.main([*args, "--config", tiny, "--config", str(overlay)])
    return out, overlay, state


def test_train_py_test_runs_on_an_imported_lm_checkpoint_and_the_check_refuses_another_config(tmp_path):
    import train
    from tests.modules.test_lm import tiny_args

    ckpt, overlay, state = import_tiny(tmp_path, "lm")
    args = [*tiny_args(tmp_path / "run", 1), f"--config={overlay}", "--trainer.limit_test_batches=1"]
    cli = train.main(["test", *args, f"--ckpt_path={ckpt}"])
    ours, _ = to_ours("lm", state)
    loaded = cli.model.net.state_dict()
    assert set(loaded) == set(ours) and all(torch.equal(loaded[k], ours[k]) for k in ours)
    assert math.isfinite(float(cli.trainer.callback_metrics["test/loss"]))
    # fit starts from the released weights at step 0 with a fresh optimizer
    cli = train.main(["fit", *args, f"--ckpt_path={ckpt}"])
    assert cli.trainer.global_step == 1
    # without the overlay the network differs: refused before anything loads, naming the fields
    with pytest.raises(SystemExit, match=r"net\.lact\.low_rank: checkpoint 4, config None"):
        train.main(["test", *tiny_args(tmp_path / "run2", 1), f"--ckpt_path={ckpt}"])


def test_train_py_predict_runs_on_an_imported_nvs_checkpoint(tmp_path):
    import train
    from datamodules.prepare import main as prepare

    ckpt, overlay, state = import_tiny(tmp_path, "nvs")
    shards, root = tmp_path / "scenes", tmp_path / "run"
    prepare(["scenes", "--out", str(shards), "--num-scenes", "2", "--views", "4", "--height", "16", "--width", "16"])  # fmt: skip
    cli = train.main(
        [
            "predict",
            f"--config={ROOT / 'configs' / 'nvs' / 'tiny.yaml'}",
            f"--config={overlay}",
            f"--trainer.default_root_dir={root}",
            f"--data.init_args.train_shards={shards}",
            f"--data.init_args.val_shards={shards}",
            f"--ckpt_path={ckpt}",
        ]
    )
    ours, _ = to_ours("nvs", state)
    loaded = cli.model.net.state_dict()
    assert set(loaded) == set(ours) and all(torch.equal(loaded[k], ours[k]) for k in ours)
    assert len(list((root / "predict").iterdir())) == 2
