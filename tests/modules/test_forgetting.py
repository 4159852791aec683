"""ForgettingSchedule on a tiny tied LM: when it fires, what it resets, and that resumed runs continue it."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from modules.forgetting import ForgettingSchedule, seeded_generator
from tests.modules.forgetting_helpers import PAD, LrRecorder, Snapshots, TinyLM


def fit(model, *callbacks, max_steps: int, root=None, ckpt_path=None, **trainer_kw) -> Trainer:
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=root,
        **trainer_kw,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def changed_at(snap: Snapshots) -> list[int]:
    """Global steps after which the embedding differs from the previous batch's."""
    return [s for s, a, b in zip(snap.steps[1:], snap.embeds, snap.embeds[1:]) if not torch.equal(a, b)]


def test_schedule_predicate():
    cb = ForgettingSchedule(every_k=3, stop_after=10, start=2)
    assert [s for s in range(1, 20) if cb.is_reset_step(s)] == [5, 8]
    assert [s for s in range(1, 20) if ForgettingSchedule(every_k=4).is_reset_step(s)] == [4, 8, 12, 16]


def test_rows_change_exactly_at_reset_steps_and_never_after_stop_after():
    # lr = 0: the optimizer leaves the weights alone, so every change is a reset.
    snap = Snapshots()
    cb = ForgettingSchedule(every_k=3, stop_after=8, seed=1)
    fit(TinyLM(lr=0.0), cb, snap, max_steps=12)
    assert changed_at(snap) == [3, 6]
    assert cb.resets == 2 and cb.last_reset_step == 6


def test_tied_embedding_stays_the_same_tensor_and_pad_row_is_zero():
    model = TinyLM(lr=0.05)
    weight, ptr = model.embed.weight, model.embed.weight.data_ptr()
    with torch.no_grad():
        model.embed.weight[PAD] = 5.0  # a reset must zero it again
    fit(model, ForgettingSchedule(every_k=2, init="normal", std=1.0, seed=0), max_steps=4)
    assert model.embed.weight is weight and model.head.weight is weight
    assert model.embed.weight.data_ptr() == ptr
    assert torch.count_nonzero(model.embed.weight[PAD]) == 0
    assert torch.count_nonzero(model.embed.weight[PAD + 1 :]) > 0


def test_model_init_draw_and_different_seeds():
    """init='model' is the module's initialiser fed the (seed, reset index) generator, pad row zeroed."""
    model = TinyLM(lr=0.0)
    fit(model, ForgettingSchedule(every_k=2, seed=7), max_steps=2)
    expected = torch.empty(model.embed.weight.shape).normal_(0.0, 1.0, generator=seeded_generator(7, 0, 1, 0))
    expected[PAD] = 0
    assert torch.equal(model.embed.weight, expected)
    other = TinyLM(lr=0.0)
    fit(other, ForgettingSchedule(every_k=2, seed=8), max_steps=2)
    assert not torch.equal(other.embed.weight, model.embed.weight)


def test_two_ranks_draw_the_same_values():
    """Two replicas, initialised differently, hold identical embeddings after the same reset."""
    a, b = TinyLM(lr=0.0), TinyLM(lr=0.0)
    assert not torch.equal(a.embed.weight, b.embed.weight)
    fit(a, ForgettingSchedule(every_k=3, seed=3), max_steps=3)
    fit(b, ForgettingSchedule(every_k=3, seed=3), max_steps=3)
    assert torch.equal(a.embed.weight, b.embed.weight)


def test_match_init_keeps_current_statistics():
    model = TinyLM(lr=0.0)
    with torch.no_grad():
        model.embed.weight[1:].normal_(3.0, 0.5)
    fit(model, ForgettingSchedule(every_k=1, init="match", seed=0), max_steps=1)
    rows = model.embed.weight[1:]
    assert abs(rows.mean().item() - 3.0) < 0.4 and abs(rows.std().item() - 0.5) < 0.25


@pytest.mark.parametrize("mode", ["none", "targets", "all"])
def test_optimizer_state_reset_only_where_configured(mode):
    snap = Snapshots()
    fit(TinyLM(), ForgettingSchedule(every_k=3, optimizer_state=mode, seed=0), snap, max_steps=4)
    at_reset = snap.opt_steps[snap.steps.index(3)]  # recorded right after the reset at step 3
    emb, other = at_reset["embed.weight"], at_reset["proj.weight"]
    assert emb == (3.0 if mode == "none" else 0.0)
    assert other == (0.0 if mode == "all" else 3.0)
    after = snap.opt_steps[snap.steps.index(4)]
    assert after["embed.weight"] == (4.0 if mode == "none" else 1.0)  # the count restarts


def test_adam_moments_zeroed_for_targets():
    model = TinyLM()
    trainer = fit(model, ForgettingSchedule(every_k=3, seed=0), max_steps=3)
    state = trainer.optimizers[0].state
    assert torch.count_nonzero(state[model.embed.weight]["exp_avg"]) == 0
    assert torch.count_nonzero(state[model.proj.weight]["exp_avg"]) > 0


def test_one_reset_per_optimizer_step_under_accumulation():
    snap = Snapshots()
    cb = ForgettingSchedule(every_k=2, seed=0)
    fit(TinyLM(lr=0.0), cb, snap, max_steps=6, accumulate_grad_batches=3)
    assert len(snap.steps) == 18 and cb.resets == 3
    changes = [i for i, (a, b) in enumerate(zip(snap.embeds, snap.embeds[1:]), 1) if not torch.equal(a, b)]
    assert changes == [5, 11, 17]  # the last micro-batch of optimizer steps 2, 4, 6 (0-based batch index)


def test_untied_output_embedding_target():
    model = TinyLM(tied=False, lr=0.0)
    head0, emb0 = model.head.weight.clone(), model.embed.weight.clone()
    fit(model, ForgettingSchedule(every_k=1, targets=["output"], seed=0), max_steps=1)
    assert not torch.equal(model.head.weight, head0) and torch.equal(model.embed.weight, emb0)


def test_named_and_pattern_targets():
    model = TinyLM(lr=0.0)
    proj0, emb0 = model.proj.weight.clone(), model.embed.weight.clone()
    fit(model, ForgettingSchedule(every_k=1, targets=["proj.*"], init="normal", seed=0), max_steps=1)
    assert not torch.equal(model.proj.weight, proj0) and torch.equal(model.embed.weight, emb0)


def test_target_matching_nothing_fails_at_fit_start_with_its_name():
    with pytest.raises(ValueError, match="'encoder.nope.weight' matches no parameter"):
        fit(TinyLM(), ForgettingSchedule(every_k=1, targets=["encoder.nope.weight"]), max_steps=1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="init='uniform'"):
        ForgettingSchedule(every_k=1, init="uniform")
    with pytest.raises(ValueError, match="optimizer_state='some'"):
        ForgettingSchedule(every_k=1, optimizer_state="some")


def test_resume_between_resets_reproduces_the_next_reset_bit_identically(tmp_path, monkeypatch):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    straight = TinyLM()
    fit(straight, ForgettingSchedule(every_k=3, seed=5), ckpt, max_steps=6, root=tmp_path)
    # Resume from step 4 (after the reset at 3, before the one at 6) with a fresh callback whose own
    # seed would be different: the checkpoint's seed and reset count must win.
    monkeypatch.setenv("PL_GLOBAL_SEED", "99")
    resumed, cb = TinyLM(), ForgettingSchedule(every_k=3)
    fit(resumed, cb, max_steps=6, root=tmp_path, ckpt_path=str(tmp_path / "ck" / "step=4.ckpt"))
    assert cb.seed == 5 and cb.resets == 2 and cb.last_reset_step == 6
    # The reset at 6 replaced the whole embedding: identical whatever batches the resumed run saw
    # (TinyLM's loader restarts its epoch; the POS data resumes exactly, see tests/modules/test_mlm.py).
    assert torch.equal(straight.embed.weight, resumed.embed.weight)
    assert not torch.equal(straight.proj.weight, resumed.proj.weight)


def test_lr_restart_scales_the_step_then_restores():
    rec = LrRecorder()
    cb = ForgettingSchedule(every_k=4, stop_after=9, lr_restart=True, lr_warmup_steps=2, seed=0)
    fit(TinyLM(lr=0.1), cb, rec, max_steps=10)
    factors = [0.5, 1.0, 1.0, 0.5]  # warmup (t+1)/2, then linear decay to 0 over the remaining steps
    expected = (
        [0.1 * f for f in factors] + [0.1 * f for f in factors] + [0.1, 0.1]
    )  # after the last reset (8): plain
    assert rec.used == pytest.approx(expected)
    assert rec.after == pytest.approx([0.1] * 10)


def test_lr_restart_needs_its_own_param_group():
    model = TinyLM()
    model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="own param group"):
        fit(model, ForgettingSchedule(every_k=2, lr_restart=True), max_steps=1)


def test_probabilistic_mode_replaces_rows_for_the_batch_only_and_freezes_the_embedding():
    model = TinyLM(lr=0.1)
    snap = Snapshots()
    before = model.embed.weight.detach().clone()
    fit(model, ForgettingSchedule(every_k=0, prob=0.5, prob_steps=3, seed=0), snap, max_steps=5)
    seen = model.seen_in_forward
    for i in range(3):  # during the probabilistic phase: some rows differ inside the forward, then restored
        differs = (seen[i] != before).any(1)
        assert differs.any() and not differs.all() and not differs[PAD]
        assert torch.equal(snap.embeds[i], before)
    assert torch.equal(seen[3], before)  # after it: the original rows, now trained
    assert not torch.equal(snap.embeds[4], before)


def test_keep_rows_survive_resets_and_probabilistic_replacement():
    model = TinyLM(lr=0.0)
    kept = model.embed.weight[[2, 3]].detach().clone()
    fit(model, ForgettingSchedule(every_k=2, keep_rows=[2, 3], prob=1.0, prob_steps=1, seed=0), max_steps=2)
    assert torch.equal(model.seen_in_forward[0][[2, 3]], kept)  # not replaced in the probabilistic step
    assert not torch.equal(model.seen_in_forward[0][4:], model.seen_in_forward[1][4:])
    assert torch.equal(model.embed.weight[[2, 3]], kept)  # nor by the reset at step 2
    assert torch.count_nonzero(model.embed.weight[PAD]) == 0
