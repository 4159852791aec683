"""NVSModule: training lowers the loss, predict writes reconstruct-once renders, bad steps are skipped,
LPIPS never downloads, TensorBoard gets the image grid. Batches are synthetic (no shards needed): a scene
whose colour is a function of the ray direction, so all its views agree."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.scenes import single_primitive_batches
from modules.lpips import backbone_path
from modules.nvs import NVSModule, nearest_input_view
from modules.nvs_outputs import NVSPredictionWriter, to_uint8
from modules.task import OptimConfig
from tests.lightning_helpers import Losses, quiet_trainer
from tests.modules.nvs_helpers import TINY, make_batch
from tests.modules.schedule_helpers import WarmupCosine


def nvs_optim(**kwargs) -> OptimConfig:
    """The NVS settings these tests were written for: weight decay 0.05, skip above a norm of 100."""
    return OptimConfig(**{"weight_decay": 0.05, "skip_grad_norm": 100.0, "lr": 4e-4, **kwargs})


def loader(count: int, **kwargs) -> DataLoader:
    """`count` fixed batches (batch_size=None: the items already are batches)."""
    return DataLoader([make_batch(seed, **kwargs) for seed in range(count)], batch_size=None)


def test_fit_20_steps_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    module = NVSModule(net=TINY, optim=nvs_optim(lr=3e-3, warmup_steps=2))
    losses = Losses()
    quiet_trainer(tmp_path, max_steps=20, callbacks=[losses], limit_val_batches=0).fit(module, loader(4))
    assert len(losses.values) == 20
    assert sum(losses.values[-4:]) / 4 < 0.7 * sum(losses.values[:4]) / 4, losses.values
    assert module.skipped_steps == 0


def test_predict_writes_renders_equal_to_the_full_forward(tmp_path):
    torch.manual_seed(0)
    module = NVSModule(net=TINY, turntable_frames=5, render_chunk=2)
    batches = loader(2, targets=3)
    out = tmp_path / "predict"
    predictions = quiet_trainer(tmp_path, callbacks=[NVSPredictionWriter(str(out))]).predict(module, batches)
    for batch, prediction in zip(batches, predictions):
        with torch.no_grad():
            full = to_uint8(module(batch))  # one pass over inputs and targets together
        assert torch.equal(prediction["views"], full)
        assert prediction["turntable"].shape == (2, 5, 16, 16, 3)
        for key in batch["key"]:
            names = {p.name for p in (out / key).iterdir()}
            assert {"view_000.png", "view_002.png", "gt_000.png", "input_001.png", "turntable.gif"} <= names
            with Image.open(out / key / "turntable.gif") as gif:
                assert gif.n_frames == 5 and gif.size == (16, 16)
            with Image.open(out / key / "view_001.png") as png:
                assert png.size == (16, 16) and png.mode == "RGB"


def test_optimizer_step_is_skipped_when_the_gradient_norm_is_too_large_or_not_finite(tmp_path):
    torch.manual_seed(0)
    module = NVSModule(net=TINY, optim=nvs_optim(skip_grad_norm=1e-9))  # every real gradient is "too large"
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, loader(3))
    assert module.skipped_steps == 3
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]), name  # not even weight decay touched them

    module = NVSModule(net=TINY)
    bad = loader(2)
    bad.dataset[1]["target_images"] = torch.full_like(bad.dataset[1]["target_images"], float("nan"))
    with pytest.warns(UserWarning, match="non-finite"):
        quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, bad)
    assert module.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_trainer_gradient_clipping_is_refused(tmp_path):
    with pytest.raises(ValueError, match="gradient_clip_val"):
        quiet_trainer(tmp_path, max_steps=1, gradient_clip_val=1.0).fit(NVSModule(net=TINY), loader(1))


def test_lpips_without_backbone_weights_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert backbone_path("alex") == expected
    for kwargs in ({"lpips_weight": 0.5, "lpips_start_step": 1000}, {"lpips_metric": True}):
        with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as info:
            NVSModule(net=TINY, **kwargs)
        assert str(expected) in str(info.value) and "Nothing is downloaded" in str(info.value)
    NVSModule(net=TINY)  # LPIPS off: nothing to load


def test_lpips_loads_from_torch_home_and_joins_the_loss(tmp_path, monkeypatch):
    import torchvision

    # SqueezeNet's 5 MB backbone stands in for AlexNet's 240 MB; random weights, as only loading is tested.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path = backbone_path("squeeze")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    torch.manual_seed(0)
    module = NVSModule(net=TINY, lpips_weight=1.0, lpips_start_step=1, lpips_net="squeeze", lpips_metric=True)
    assert not any("lpips" in name for name, _ in module.named_parameters())  # frozen, not trained or saved
    batches = loader(2, size=64)  # LPIPS backbones need images of at least ~32 px
    first = batches.dataset[0]
    with torch.no_grad():
        mse_at_start = float(torch.nn.functional.mse_loss(module(first), first["target_images"]))
    losses = Losses()
    run = quiet_trainer(tmp_path, max_steps=2, callbacks=[losses], limit_val_batches=1)
    run.fit(module, batches, loader(1, size=64))
    assert losses.values[0] == pytest.approx(mse_at_start, rel=1e-5)  # step 0: before lpips_start_step
    assert float(run.callback_metrics["train/lpips"]) > 0  # step 1: LPIPS joined the loss
    assert torch.isfinite(run.callback_metrics["val/lpips"])


def test_validation_logs_metrics_and_the_image_grid(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    module = NVSModule(net=TINY, log_images=2)
    run = quiet_trainer(tmp_path, logger=logger, max_steps=2, limit_val_batches=2, val_check_interval=2)
    run.fit(module, loader(2), loader(2, inputs=3, targets=2))
    for name in ("val/psnr", "val/ssim", "val/psnr_nearest_view"):
        assert torch.isfinite(run.callback_metrics[name]), name
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    assert "val/inputs|targets|predictions" in events.Tags()["images"]
    image = events.Images("val/inputs|targets|predictions")[-1]
    # Two scenes, each a row of 3 inputs | 2 targets | 2 predictions, 16 px tiles with 2 px padding.
    assert (image.height, image.width) == (2 + 2 * 18, 2 + 7 * 18)


def test_bf16_mixed_trains_and_scores_in_fp32(tmp_path):
    """`trainer.precision: bf16-mixed` (the paper configs) runs a training step, and the held-out scores do
    not depend on it: the nearest-view baseline (no network involved) scores the same as in fp32."""
    torch.manual_seed(0)
    module = NVSModule(net=TINY, optim=nvs_optim())
    quiet_trainer(tmp_path, precision="bf16-mixed", max_steps=1).fit(module, loader(1))
    scores = {}
    for precision in ("32-true", "bf16-mixed"):
        run = quiet_trainer(tmp_path, precision=precision)
        run.test(module, loader(2), verbose=False)
        scores[precision] = {k: float(v) for k, v in run.callback_metrics.items()}
    for name in ("test/psnr_nearest_view", "test/ssim_nearest_view"):
        assert scores["bf16-mixed"][name] == pytest.approx(scores["32-true"][name], abs=1e-6), name
    assert math.isfinite(scores["bf16-mixed"]["test/ssim"])


def test_nearest_input_view_copies_the_closest_camera():
    batch = make_batch(0, batch=1, inputs=3, targets=1)
    centres = torch.linalg.inv(torch.cat([batch["input_w2c"], batch["target_w2c"]], dim=1))[0, :, :3, 3]
    closest = (centres[:3] - centres[3]).norm(dim=-1).argmin()
    copied = nearest_input_view(batch["input_images"], batch["input_w2c"], batch["target_w2c"])
    assert torch.equal(copied[0, 0], batch["input_images"][0, closest])


def test_warmup_then_cosine():
    schedule = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)


class RecordLosses(Callback):
    """Training losses of CLI runs (the CLI builds the callback, so the list lives on the class)."""

    values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RecordLosses.values.append(float(outputs["loss"]))


def test_cli_fit_tiny_config_on_scene_shards_then_predict(tmp_path):
    """The path a user takes: shards from the data layer, `train.py fit` with configs/nvs/tiny.yaml (20 steps),
    then `train.py predict --ckpt_path` writing PNGs and a turntable per scene."""
    import train
    from datamodules.prepare import main as prepare

    shards, root = tmp_path / "scenes", tmp_path / "run"
    prepare(["scenes", "--out", str(shards), "--num-scenes", "6", "--views", "4", "--height", "16", "--width", "16"])  # fmt: skip
    common = [
        "--config=configs/nvs/tiny.yaml",
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.train_shards={shards}",
        f"--data.init_args.val_shards={shards}",
    ]
    RecordLosses.values = []
    train.main(["fit", *common, "--trainer.callbacks+=tests.modules.test_nvs.RecordLosses"])
    losses = RecordLosses.values
    assert len(losses) == 20 and sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    checkpoint = root / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 20  # plain data: no unpickled classes

    train.main(["predict", *common, f"--ckpt_path={checkpoint}"])
    scenes = sorted(p.name for p in (root / "predict").iterdir())
    assert len(scenes) == 6
    for scene in scenes:
        names = {p.name for p in (root / "predict" / scene).iterdir()}
        assert names == {"input_000.png", "input_001.png", "gt_000.png", "view_000.png", "turntable.gif"}


def test_bad_fsdp_param_dtype_fails_at_construction():
    with pytest.raises(ValueError, match="fsdp_param_dtype"):
        NVSModule(net=TINY, fsdp_param_dtype="bf16")
    # One process, no ModelParallelStrategy: configure_model leaves the network unsharded.
    module = NVSModule(net=TINY, fsdp_param_dtype="bfloat16")
    module.configure_model()
    assert all(type(p) is torch.nn.Parameter for p in module.net.parameters())


def test_train_py_test_scores_held_out_views_against_the_nearest_input_view(tmp_path, monkeypatch, capsys):
    import train
    from datamodules.prepare import main as prepare

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no LPIPS weights: no LPIPS score
    shards, root = tmp_path / "scenes", tmp_path / "run"
    prepare(["scenes", "--out", str(shards), "--num-scenes", "3", "--views", "4", "--height", "16", "--width", "16"])  # fmt: skip
    common = [
        "--config=configs/nvs/tiny.yaml",
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.train_shards={shards}",
        f"--data.init_args.test_shards={shards}",
    ]
    train.main(["fit", *common, "--trainer.max_steps=2"])
    cli = train.main(["test", *common, "--ckpt_path=last"])
    metrics = cli.trainer.callback_metrics
    names = {f"test/{m}{s}" for m in ("psnr", "ssim") for s in ("", "_nearest_view")}
    assert names | {"test/loss"} <= set(metrics) and not any("lpips" in k for k in metrics)
    assert all(math.isfinite(float(metrics[k])) for k in names)
    assert 0 < float(metrics["test/ssim_nearest_view"]) <= 1
    printed = capsys.readouterr().out
    assert all(name in printed for name in names)


def test_colour_probe_a_small_model_learns_to_carry_single_colours(tmp_path):
    """Fails when colour stops flowing from the input views to the predictions: a tiny model trained 700
    steps (~15 s) on single-primitive scenes must move its predicted object pixels by a good fraction of an
    R/B swap of its inputs (0.39 measured; an untrained or colour-blind model gives about 0)."""
    from modules.nvs import colour_transfer

    torch.manual_seed(0)
    net = {**TINY, "lact": {"heads": 2, "inter_multi": 2.0, "base_lr": 1.0}, "output_bias": 2.0}
    module = NVSModule(net={**net, "colour_values": True}, optim=nvs_optim(lr=3e-3, warmup_steps=10))
    val = single_primitive_batches(1, seed=2, batch=16)[0]
    before = colour_transfer(module.net.eval(), val)
    train = DataLoader(single_primitive_batches(8, seed=1) * 100, batch_size=None)
    quiet_trainer(tmp_path, max_steps=700, limit_val_batches=0).fit(module, train)
    after = colour_transfer(module.net.eval(), val)
    assert before < 0.01 and after > 0.15, (before, after)


def test_chroma_mse_ignores_brightness_errors_and_counts_wrong_hues():
    from modules.nvs import chroma_mse

    red = torch.zeros(2, 3, 4, 4)
    red[:, 0] = 0.9
    assert chroma_mse(red + 0.1, red) < 1e-12  # the same error in every channel: brightness only
    grey = red.mean(dim=1, keepdim=True).expand_as(red)  # 0.3 in every channel
    # error (-0.6, 0.3, 0.3) has mean 0, so its chroma part is itself: (0.36 + 0.09 + 0.09) / 3
    torch.testing.assert_close(chroma_mse(grey, red), torch.tensor(0.18))


def test_chroma_weight_adds_the_weighted_chroma_mse_to_the_training_loss():
    from modules.nvs import chroma_mse

    torch.manual_seed(0)
    batch = make_batch(0)
    plain = NVSModule(net=TINY, optim=nvs_optim())
    weighted = NVSModule(net=TINY, optim=nvs_optim(), chroma_weight=4.0)
    weighted.load_state_dict(plain.state_dict())
    for module in (plain, weighted):
        module.log = lambda *args, **kwargs: None  # no trainer attached
    with torch.no_grad():
        pred = plain(batch).float()
        expected = plain.training_step(batch, 0) + 4.0 * chroma_mse(pred, batch["target_images"].float())
        torch.testing.assert_close(weighted.training_step(batch, 0), expected)
    with pytest.raises(ValueError, match="NVSModule.chroma_weight must be a number >= 0"):
        NVSModule(net=TINY, chroma_weight=-1.0)
