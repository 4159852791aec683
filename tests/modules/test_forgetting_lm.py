"""ForgettingSchedule on the LaCT language model (issue 6): the callback works beyond the toy encoder."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from datamodules.mqar import MQARDataModule
from lact.models.lm import LMConfig
from modules.forgetting import _RESET_STREAM, ForgettingSchedule, seeded_generator
from modules.lm import LMModule
from modules.task import OptimConfig


class EmbeddingAfterEachStep(Callback):
    """Records the token embedding after every training batch (placed after the ForgettingSchedule)."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append(pl_module.token_embedding().weight.detach().clone())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.usefixtures("one_thread")
def test_forgetting_resets_the_lact_lm_embedding_at_reset_steps(tied):
    seed_everything(0)
    config = LMConfig(
        vocab_size=64,
        dim=32,
        num_layers=1,
        num_heads=4,
        lact={"heads": 2, "chunk_size": 16},
        window=8,
        tie_embeddings=tied,
    )
    module = LMModule(config, optim=OptimConfig(lr=1e-2, warmup_steps=0))
    embedding = module.token_embedding().weight
    data = MQARDataModule(vocab_size=64, num_pairs=4, gap=8, seq_len=48, batch_size=4, batches_per_epoch=6)
    forget = ForgettingSchedule(every_k=2, stop_after=5, seed=7)
    record = EmbeddingAfterEachStep()
    trainer = Trainer(
        accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[forget, record],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)

    assert module.token_embedding().weight is embedding, (
        "the reset must happen in place, never a new Parameter"
    )
    if tied:
        assert module.output_embedding() is embedding
    # Steps 2 and 4 are resets (below stop_after=5): their rows are a fresh draw of the model's own
    # initialiser, N(0, init_std), from the callback's generator, not a trained continuation.
    for reset_index, step in ((1, 2), (2, 4)):
        expected = torch.empty(embedding.shape)
        generator = seeded_generator(7, _RESET_STREAM, reset_index, 0)  # (seed, stream, reset number, target)
        module.init_parameter_(embedding, expected, generator)
        torch.testing.assert_close(record.rows[step - 1], expected, rtol=0, atol=0)
    # Between resets and after stop_after the embedding trains on: it moves, and is no fresh draw.
    for step in (3, 5, 6):
        assert not torch.equal(record.rows[step - 1], record.rows[step - 2])
    assert forget.resets == 2


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.usefixtures("one_thread")
def test_freeze_all_but_embeddings_trains_the_embeddings_and_nothing_else(tied):
    from modules.forgetting import freeze_all_but_embeddings

    seed_everything(0)
    config = LMConfig(
        vocab_size=64, dim=32, num_layers=1, num_heads=4, lact={"heads": 2, "chunk_size": 16}, window=8,
        tie_embeddings=tied,
    )  # fmt: skip
    module = LMModule(config, optim=OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1))
    trained = freeze_all_but_embeddings(module)
    assert trained == (
        ["net.token_embedding.weight"] if tied else ["net.token_embedding.weight", "net.lm_head.weight"]
    )
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = MQARDataModule(vocab_size=64, num_pairs=4, gap=8, seq_len=48, batch_size=4, batches_per_epoch=3)
    trainer = Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for name, p in module.named_parameters():
        if name in trained:
            assert id(p) in optimized and not torch.equal(p, before[name]), f"{name} must train"
        else:  # bit for bit: no update, no weight decay
            assert id(p) not in optimized and torch.equal(p, before[name]), f"{name} must stay frozen"
    assert len(before) > 10  # the body has parameters to hold still
