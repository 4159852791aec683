"""`compile: true` in a network config (lact/nn.py compile_blocks, applied by TaskModule.configure_model):
compiled blocks compute what eager blocks compute, recompile a bounded number of times across sequence lengths,
view counts and clip lengths, and a compiled tiny fit runs and resumes. Compiling with FSDP2 is in tests/modules/test_scale.py.

Inductor on the CPU compiles C++ with the system compiler, so these tests use the tiniest networks; the
recompilation counts use dynamo's counting backend (recompiling is dynamo's decision, not the backend's)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from torch._dynamo.testing import CompileCounter

from lact.models.lm import LaCTLM, LMConfig
from lact.models.nvs import NVSConfig, NVSNet
from lact.models.video import VideoConfig, VideoNet
from lact.nn import compile_blocks
from modules.lm import LMModule
from modules.nvs import NVSModule
from tests.modules.nvs_helpers import TINY, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LM_TINY = {
    "vocab_size": 32, "dim": 16, "num_layers": 2, "num_heads": 2, "window": 8,
    "lact": {"heads": 2, "chunk_size": 8, "momentum": True},
}  # fmt: skip
VIDEO_TINY = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/video/tiny.yaml").read_text())[
    "model"
]["init_args"]["net"]  # 16x16 clips of 4 chunks of 2 frames, 128 tokens per chunk, 2 blocks of width 32


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def nvs_loss(net: NVSNet, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = net(
        batch["input_images"], batch["input_intrinsics"], batch["input_w2c"],
        batch["target_intrinsics"], batch["target_w2c"],
    )  # fmt: skip
    return out, (out - batch["target_images"]).square().mean()


def video_net() -> VideoNet:
    """The tiny video network with its zero-initialised output head and LaCT output gates set non-zero, so that
    the output and every parameter's gradient depend on both branches (at init the LaCT branch is off)."""
    net = VideoNet(VideoConfig(**VIDEO_TINY))
    with torch.no_grad():
        net.head.weight.normal_(std=0.1)
        for block in net.blocks:
            block.lact.gate_proj.weight.normal_(std=0.5)
    return net


def video_batch(batch: int = 2, chunks: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(batch, 3, 2 * chunks, 16, 16, generator=g)
    return {
        "clean": clean,
        "noisy": torch.randn(clean.shape, generator=g),
        "t": torch.rand(batch, chunks, generator=g),
    }


def video_loss(net: VideoNet, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = net(batch["noisy"], batch["clean"], batch["t"])
    return out, (out - (batch["noisy"] - batch["clean"])).square().mean()


def lm_loss(net: LaCTLM, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = net(tokens[:, :-1])
    return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize(
    "task",
    # inductor compiles the video block's forward and backward in about 2 CPU-minutes (6 on a loaded machine)
    ["lm", "nvs", pytest.param("video", marks=pytest.mark.slow)],
)
def test_compiled_blocks_match_eager_outputs_and_gradients(task):
    """fp32, inductor: outputs and every parameter gradient within 1e-4 (relative to the largest entry) of
    eager; the ops are the same, only their fusion and summation order differ."""
    torch.manual_seed(0)
    if task == "lm":
        eager = LaCTLM(LMConfig(**LM_TINY))
        data = torch.randint(0, 32, (2, 13))  # 12 inputs: a chunk of 8 (an update) and a partial 4
        loss_fn = lm_loss
    elif task == "nvs":
        eager = NVSNet(NVSConfig(**TINY))
        data = make_batch(0)
        loss_fn = nvs_loss
    else:  # configs/video/tiny.yaml: 4 chunks, 7 interleaved segments, 3 fast-weight updates per block
        eager = video_net()
        data = video_batch()
        loss_fn = video_loss
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled.blocks)
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    compile_blocks(compiled.blocks)  # idempotent (configure_model may run twice)

    results = []
    for net in (eager, compiled):
        out, loss = loss_fn(net, data)
        loss.backward()
        results.append((out.detach(), {n: p.grad for n, p in net.named_parameters()}))
    (out_e, grads_e), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4 * out_e.abs().max().item())
    assert grads_e.keys() == grads_c.keys()
    for name, grad in grads_e.items():
        assert grad is not None and grads_c[name] is not None, name
        scale = grad.abs().max().item() + 1e-12
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_lm_recompiles_once_for_new_lengths_and_once_per_new_chunk_count():
    """Lengths with the same number of chunks (a different last partial chunk) share one dynamic graph after
    the second length. Bounded extra graphs: a new number of chunks (the chunk loop unrolls), a length that
    is a multiple of the attention window (no padding branch), a 1-token last chunk (dynamo specialises
    sizes 0 and 1). Lengths seen before never compile again."""
    net = LaCTLM(LMConfig(**LM_TINY))  # chunk 8, window 8
    counter = CompileCounter()
    compile_blocks(net.blocks, backend=counter)

    def step(length: int) -> None:
        lm_loss(net, torch.randint(0, 32, (2, length + 1)))[1].backward()

    step(20)  # chunks 8, 8, 4
    assert counter.frame_count == 1  # both blocks share the graph
    for length in (21, 22, 23, 18, 19):  # 3 chunks, the last one 2-7 tokens
        step(length)
    assert counter.frame_count == 2, counter.frame_count  # the static graph, then one dynamic graph
    step(24)  # a multiple of the window
    for length in (27, 29, 30, 31):  # 4 chunks
        step(length)
    assert counter.frame_count <= 4, counter.frame_count
    seen = counter.frame_count
    for length in (20, 21, 22, 23, 18, 19, 24, 27, 29, 30, 31):
        step(length)
    assert counter.frame_count == seen


PACKED_EOD = 31
# documents of every kind for chunk 8: shorter than a chunk, several chunks, ending on a chunk boundary (16),
# empty (length 1), cut by the row end; every layout differs in documents, chunk counts and tail groups
LAYOUTS = [
    [[3, 20, 9, 7, 9], [30, 13]],
    [[5, 5, 5, 30], [2, 40]],
    [[1, 1, 17, 9, 20], [12, 12, 30]],
    [[48], [8, 8, 8, 8, 16]],
    [[9, 9, 9, 9, 9, 9], [3, 3, 40]],
    [[16, 16, 16], [1, 2, 3, 4, 40]],
]


def test_lm_packed_documents_do_not_recompile_for_new_document_layouts():
    """With net.eod_id, the schedule over the document layout (whose Python ints change with every batch)
    runs eagerly between compiled pieces of the block, so a batch with a new layout never recompiles: the
    first batch compiles, one of a new length once more (dynamic), then no layout compiles again. The
    outputs and gradients through the compiled pieces (aot_eager: dynamo and AOT autograd, no codegen) equal
    eager."""
    from tests.lact.models.test_lm import packed_rows

    net = LaCTLM(LMConfig(**LM_TINY, eod_id=PACKED_EOD))
    eager = copy.deepcopy(net)
    counter = CompileCounter()
    compile_blocks(net.blocks, backend=counter)

    def batch(i: int, length: int) -> torch.Tensor:
        return packed_rows(LAYOUTS[i], seed=i, eod=PACKED_EOD)[:, :length]

    lm_loss(net, batch(0, 41))[1].backward()
    first = counter.frame_count
    for i in range(1, 4):
        lm_loss(net, batch(i, 41))[1].backward()
    assert counter.frame_count == first, (first, counter.frame_count)
    lm_loss(net, batch(4, 45))[1].backward()  # a new length: the sizes become dynamic
    second = counter.frame_count
    for i in (5, 0, 1, 2, 3):
        lm_loss(net, batch(i, 43))[1].backward()
    assert counter.frame_count == second, (second, counter.frame_count)

    torch._dynamo.reset()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled.blocks, backend="aot_eager")
    for i in (2, 3):
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            logits, loss = lm_loss(model, batch(i, 41))
            loss.backward()
            results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
        (out_e, grads_e), (out_c, grads_c) = results
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_nvs_recompiles_at_most_once_per_dimension_across_view_counts():
    """The bidirectional schedule has no loop over views: the first call compiles for its shapes, the first
    new view count recompiles once with the view count dynamic, the first new batch size once more; then
    every (input, target) view count and batch size reuses the graph."""
    net = NVSNet(NVSConfig(**TINY))
    counter = CompileCounter()
    compile_blocks(net.blocks, backend=counter)
    shapes = ((2, 1, 2), (3, 1, 2), (2, 2, 2), (1, 3, 2), (4, 2, 3), (2, 3, 4), (2, 1, 2))
    for inputs, targets, batch in shapes:
        nvs_loss(net, make_batch(0, batch=batch, inputs=inputs, targets=targets))[1].backward()
    assert counter.frame_count == 3, counter.frame_count
    for inputs, targets, batch in ((1, 1, 2), (5, 2, 2), (3, 4, 5)):
        nvs_loss(net, make_batch(0, batch=batch, inputs=inputs, targets=targets))[1].backward()
    assert counter.frame_count == 3, counter.frame_count


def test_video_recompiles_once_for_batch_sizes_and_once_per_new_clip_length():
    """The interleaved schedule's loop over chunks unrolls, so a new number of chunks per clip compiles one
    more graph; the batch size becomes dynamic at its first change (size 1 is specialised by dynamo, one more
    graph). Shapes seen before never compile again. Training clips all have one length (net.num_frames)."""
    net = video_net()
    counter = CompileCounter()
    compile_blocks(net.blocks, backend=counter)

    def step(batch: int, chunks: int) -> None:
        video_loss(net, video_batch(batch, chunks))[1].backward()

    step(2, 4)
    assert counter.frame_count == 1  # both blocks share the graph, and the block has no graph break
    for batch in (3, 5):
        step(batch, 4)
    assert counter.frame_count == 2, counter.frame_count
    step(1, 4)
    assert counter.frame_count == 3, counter.frame_count
    for batch, chunks in ((2, 3), (3, 3), (2, 2), (4, 2)):
        step(batch, chunks)
    assert counter.frame_count == 5, counter.frame_count
    for batch, chunks in ((2, 4), (3, 4), (1, 4), (5, 3), (3, 2)):
        step(batch, chunks)
    assert counter.frame_count == 5, counter.frame_count


def test_compile_flag_is_validated_and_applied_by_configure_model():
    with pytest.raises(ValueError, match="LMConfig.compile"):
        LMConfig(compile="yes")
    with pytest.raises(ValueError, match="NVSConfig.compile"):
        NVSConfig(**TINY, compile=1)
    module = NVSModule(net={**TINY, "compile": True})
    assert module.hparams["net"]["compile"] is True
    module.configure_model()
    assert all(block._compiled_call_impl is not None for block in module.net.blocks)
    eager = LMModule(LM_TINY)
    eager.configure_model()
    assert all(block._compiled_call_impl is None for block in eager.net.blocks)


class RecordCompiledFit(Callback):
    """The start step of each fit, whether every block was compiled then, and the training losses."""

    starts: list[tuple[int, bool]] = []
    losses: list[float] = []

    def on_train_start(self, trainer, pl_module):
        compiled = all(b._compiled_call_impl is not None for b in pl_module.net.blocks)
        RecordCompiledFit.starts.append((trainer.global_step, compiled))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RecordCompiledFit.losses.append(float(outputs["loss"]))


@pytest.mark.slow  # inductor compiles the tiny NVS block's forward and backward once: about a minute on 2 cores
def test_compiled_tiny_fit_runs_and_resumes(tmp_path):
    """`train.py fit` with configs/nvs/tiny.yaml and net.compile: true for 3 steps, then `--ckpt_path last` to
    5: the resumed run starts at step 3 with compiled blocks and the losses stay finite."""
    import train
    from datamodules.prepare import main as prepare

    shards, root = tmp_path / "scenes", tmp_path / "run"
    prepare(["scenes", "--out", str(shards), "--num-scenes", "4", "--views", "3", "--height", "16", "--width", "16"])  # fmt: skip
    common = [
        "--config=configs/nvs/tiny.yaml",
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.train_shards={shards}",
        "--model.init_args.net.compile=true",
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks+=tests.modules.test_compile.RecordCompiledFit",
    ]
    RecordCompiledFit.starts, RecordCompiledFit.losses = [], []
    train.main(["fit", *common, "--trainer.max_steps=3"])
    cli = train.main(["fit", *common, "--trainer.max_steps=5", "--ckpt_path=last"])
    assert RecordCompiledFit.starts == [(0, True), (3, True)]
    assert cli.trainer.global_step == 5 and len(RecordCompiledFit.losses) == 5
    assert all(math.isfinite(loss) for loss in RecordCompiledFit.losses)
    hparams = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["net"]["compile"] is True
