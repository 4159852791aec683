"""The masked-LM module of the structural-ICL toy: loss/accuracy, the holdout re-draw, and train.py runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

import train
from datamodules.pos import POSDataModule
from modules.mlm import MaskedLMModule
from modules.task import OptimConfig

TINY = ["fit", "--config=configs/icl/base.yaml", "--config=configs/icl/tiny.yaml", "--trainer.logger=false"]


def test_accuracy_counts_a_sequence_only_when_all_masked_tokens_are_right():
    m = MaskedLMModule(net=dict(vocab_size=5, dim=8, depth=1, num_heads=2, max_len=3))
    labels = torch.tensor([[-100, 2, 3], [-100, 2, 3]])
    m.net = Echo()  # predicts its input
    _, acc = m._loss_and_acc({"input_ids": torch.tensor([[1, 2, 3], [1, 2, 4]]), "labels": labels})
    assert acc.tolist() == [1.0, 0.0]


class FavoursZero(torch.nn.Module):
    """Scores id 0 highest everywhere, then the right answer 2, then everything else."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, 5)
        logits[..., 0], logits[..., 2] = 9.0, 5.0
        return logits


def test_context_accuracy_restricts_the_argmax_to_visible_ids():
    m = MaskedLMModule(net=dict(vocab_size=5, dim=8, depth=1, num_heads=2, max_len=3))
    m.net = FavoursZero()
    batch = {"input_ids": torch.tensor([[1, 2, 3], [1, 4, 3]]), "labels": torch.tensor([[-100, 2, -100]] * 2)}
    _, acc, ctx = m._loss_and_acc(batch, context_acc=True)
    assert acc.tolist() == [0.0, 0.0]  # id 0 wins over the whole vocabulary
    assert ctx.tolist() == [1.0, 0.0]  # among visible ids: 2 wins in the first, absent in the second


class Echo(torch.nn.Module):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(ids, 5).float() * 10


class SeenHoldoutRows(Callback):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids, self.rows = ids, []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.rows.append(pl_module.net.embed.weight[self.ids].detach().clone())


def test_holdout_rows_are_redrawn_for_evaluation_and_restored():
    dm = POSDataModule(class_size=20, holdout_size=10, batch_size=8, eval_size=16)
    model = MaskedLMModule(net=dict(vocab_size=dm.vocab_size, dim=16, depth=1, num_heads=2, max_len=7))
    ids = dm.holdout_token_ids
    with torch.no_grad():
        model.net.embed.weight[ids] = 7.0  # "drifted" rows, far from the init distribution
    before = model.net.embed.weight.detach().clone()
    seen = SeenHoldoutRows(ids)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[seen])
    trainer.validate(model, datamodule=dm, verbose=False)
    assert len(seen.rows) == len(dm.eval_sets)
    for rows in seen.rows:  # every set evaluated with one fresh init-distribution draw
        assert torch.equal(rows, seen.rows[0]) and rows.abs().max() < 7.0
        assert abs(rows.std().item() - model.net.embed_std) < 0.3 * model.net.embed_std
    assert torch.equal(model.net.embed.weight, before)
    assert {f"val/{n}_{m}" for n in dm.eval_sets for m in ("acc", "ctx_acc")} <= set(trainer.callback_metrics)


def test_train_py_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    """Through the CLI with the forgetting callback (resets at 3 and 6): stop at 4, resume to 6.

    The checkpoint at 4 (written after the evaluation at 4) lies between the resets."""
    straight = train.main([*TINY, f"--trainer.default_root_dir={tmp_path / 'a'}"])
    root = tmp_path / "b"
    train.main([*TINY, f"--trainer.default_root_dir={root}", "--trainer.max_steps=4"])
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = train.main([*TINY, f"--trainer.default_root_dir={root}", "--ckpt_path=last"])
    assert resumed.trainer.global_step == straight.trainer.global_step == 6
    cb = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "ForgettingSchedule")
    assert cb.resets == 2 and cb.last_reset_step == 6
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ckpt = torch.load(Path(root) / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ForgettingSchedule")]
    assert state == {"seed": 0, "resets": 2, "last_reset_step": 6}


def test_holdout_rows_match_the_trained_rows_statistics_or_are_kept():
    dm = POSDataModule(class_size=20, holdout_size=10, batch_size=8, eval_size=16)
    ids = dm.holdout_token_ids
    for rule in ("match", "keep"):
        model = MaskedLMModule(
            net=dict(vocab_size=dm.vocab_size, dim=16, depth=1, num_heads=2, max_len=7), holdout_init=rule
        )
        with torch.no_grad():
            w = model.net.embed.weight
            w.normal_(3.0, 2.0)  # "trained" rows: far from the N(0, 1) initialiser
            w[ids] = -7.0  # drifted held-out rows
            w[0] = 0.0
        before = w.detach().clone()
        seen = SeenHoldoutRows(ids)
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[seen])
        trainer.validate(model, datamodule=dm, verbose=False)
        rows = seen.rows[0]
        if rule == "keep":
            assert (rows == -7.0).all()
        else:  # the trained rows' statistics, not the initialiser's nor the drifted rows'
            assert abs(rows.mean().item() - 3.0) < 0.3 and abs(rows.std().item() - 2.0) < 0.3
        assert torch.equal(model.net.embed.weight, before)


def test_unknown_holdout_init_is_named():
    with pytest.raises(ValueError, match="holdout_init='fresh'"):
        MaskedLMModule(net=dict(vocab_size=5), holdout_init="fresh")


def test_untied_output_embedding_is_a_forgetting_target_and_can_skip_decay():
    net = dict(vocab_size=40, dim=8, depth=1, num_heads=2, max_len=7, tie_embeddings=False)
    m = MaskedLMModule(net=net, optim=OptimConfig(no_decay=["net.head.weight"], total_steps=10))
    assert (
        m.output_embedding() is m.net.head.weight and m.output_embedding() is not m.token_embedding().weight
    )
    out = torch.empty(40, 8)
    m.init_parameter_(m.net.head.weight, out, torch.Generator().manual_seed(0))
    assert abs(out.std().item() - m.net.embed_std) < 0.2 * m.net.embed_std
    groups = {g["name"]: g["params"] for g in m.configure_optimizers()["optimizer"].param_groups}
    assert not any(p is m.net.head.weight for p in groups["matrices"])  # no_decay: ["net.head.weight"]


def test_train_py_test_scores_every_evaluation_set(tmp_path):
    cli = train.main(["test", *TINY[1:], f"--trainer.default_root_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    for name in ("val", "tail", "switch_head", "switch_tail", "holdout"):
        assert 0 <= metrics[f"test/{name}_acc"] <= 1 and torch.isfinite(metrics[f"test/{name}_loss"])
