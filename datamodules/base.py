"""LightningDataModules over WebDataset shards: a base class and one generic module per modality.

The task DataModules (novel view synthesis, language model, video) subclass these and override
``sample_transform`` (e.g. pick input and target views, add noise) or ``dataset``; everything about
shards, ranks, workers, epochs and bad data stays here.

Training draws ``batches_per_epoch`` full batches per epoch on every rank from an endless resampled
stream; the stream of a pass is seeded by the trainer's global step when the pass starts. The training
loader is resumable: checkpoints hold the pass's seed and how many of its batches were consumed, so a run
resumed anywhere (also mid-epoch, with DataLoader workers) sees exactly the batches the uninterrupted run
saw (datamodules/README.md, "Exact resume"). Validation is one exact pass over ``val_shards``. The damage
known to the readers (datamodules.errors.DamageRegistry) is part of the DataModule's checkpoint state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.errors import DamageRegistry, DataConfigError
from datamodules.readers import (
    CurriculumReader,
    scene_dataset,
    token_dataset,
    train_loader,
    val_loader,
    video_dataset,
)
from datamodules.shards import ShardReader


def consumed_batches(trainer) -> int:
    """Training batches a run has consumed (optimizer steps x gradient accumulation); 0 without a trainer.
    Where the generated-data loaders resume their stream."""
    return 0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches


class StepPositionedLoader(DataLoader):
    """A training loader over generated data whose item n is a pure function of (seed, n). Each time a pass
    starts, it sets ``dataset.start`` to ``start_fn()``, the position its DataModule computes from the batches
    already consumed (`consumed_batches`): a resumed run continues the stream, and a checkpoint needs no
    loader state. Lightning's stateful-loader interface is implemented with that empty state so that resuming
    in the middle of an epoch (always, with these endless epochs) does not warn that the data would not
    resume."""

    def __init__(self, dataset, start_fn: Callable[[], int], **kwargs):
        super().__init__(dataset, **kwargs)
        self.start_fn = start_fn

    def __iter__(self):
        self.dataset.start = self.start_fn()
        return super().__iter__()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def check_sizes(owner: str, minimum: int = 1, **fields) -> None:
    """Raise ValueError naming the field when a size (an int, or a list/tuple of them; None = unset) is
    not an integer >= ``minimum``. DataModules call it in ``__init__``, so a bad config fails at once."""
    for name, value in fields.items():
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < minimum):
                raise ValueError(f"{owner}: {name} must be >= {minimum} (an integer), got {value!r}")


def check_curriculum(owner: str, curriculum: Sequence[dict] | None) -> list[dict]:
    """The ``curriculum`` argument of the DataModules, checked: a list of mappings with ``shards`` and one of
    ``until_step`` (an integer >= 1) or ``until_fraction`` (of the trainer's max_steps, in (0, 1)). Raises
    ValueError naming the stage and what is expected."""
    stages = []
    for i, stage in enumerate(curriculum or []):
        keys = set(stage) if isinstance(stage, dict) else set()
        if keys not in ({"shards", "until_step"}, {"shards", "until_fraction"}):
            raise ValueError(
                f"{owner}: curriculum[{i}] must be a mapping with the keys shards and until_step (or "
                f"until_fraction), got {stage!r}"
            )
        if "until_step" in stage:
            until = stage["until_step"]
            if isinstance(until, bool) or not isinstance(until, int) or until < 1:
                raise ValueError(
                    f"{owner}: curriculum[{i}].until_step must be an integer >= 1, got {until!r}"
                )
        else:
            until = stage["until_fraction"]
            if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 < until < 1:
                raise ValueError(
                    f"{owner}: curriculum[{i}].until_fraction must be a number in (0, 1) (a fraction of "
                    f"trainer.max_steps), got {until!r}"
                )
        stages.append(dict(stage))
    return stages


def curriculum_steps(owner: str, curriculum: list[dict], max_steps: int | None) -> list[int]:
    """Each stage's until_step, with until_fraction resolved against ``max_steps`` (the trainer's; fixed for
    a run, so resumed runs resolve it alike). Raises ValueError when the steps do not increase or a fraction
    has no max_steps to refer to."""
    steps = []
    for i, stage in enumerate(curriculum):
        if "until_step" in stage:
            until = stage["until_step"]
        elif max_steps is None or max_steps < 1:
            raise ValueError(
                f"{owner}: curriculum[{i}].until_fraction needs trainer.max_steps >= 1, got {max_steps!r}; "
                "set max_steps or use until_step"
            )
        else:
            until = max(1, round(stage["until_fraction"] * max_steps))
        if steps and until <= steps[-1]:
            raise ValueError(
                f"{owner}: curriculum[{i}] ends at step {until}, not after the stage before it (step "
                f"{steps[-1]}); the stages must end in increasing order"
            )
        steps.append(until)
    return steps


def fit_loop_position(trainer) -> int | None:
    """Training batches the trainer has taken from its loader in the current epoch (None outside a fit)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return None if loop is None else loop.batch_progress.current.ready


class ShardDataModule(LightningDataModule):
    """Train and validation loaders from shard specs (brace pattern, glob, folder, or list of them).

    Args:
        train_shards, val_shards: shards to train on / validate on (None: no loader of that kind).
        batch_size: samples per training batch; ``val_batch_size`` defaults to it.
        num_workers: DataLoader worker processes per rank.
        batches_per_epoch: training batches per epoch, identical on every rank.
        shuffle_buffer: raw samples held for shuffling in training.
        seed: base seed of the training stream.
        max_bad_samples: distinct damaged samples/shards skipped on this rank before the run stops.
        pin_memory: passed to the DataLoader.
        curriculum: stages trained before ``train_shards``: a list of ``{"shards": spec, "until_step": N}``
            (or ``"until_fraction": f``, the step f * trainer.max_steps) in increasing order. A training pass that starts at global step s reads the shards of the first
            stage with s < until_step, and ``train_shards`` once s is past every stage. Stages switch at pass
            boundaries (every ``batches_per_epoch`` steps; an until_step that is a multiple of it switches
            exactly there), and the stage is a function of the step, so resumed runs read what the
            uninterrupted run read. E.g. simple scenes first, then the full distribution.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str] | None = None,
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        batches_per_epoch: int = 1000,
        shuffle_buffer: int = 64,
        seed: int = 0,
        max_bad_samples: int = 16,
        pin_memory: bool = False,
        curriculum: Sequence[dict] | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        check_sizes(
            name, batch_size=batch_size, val_batch_size=val_batch_size, batches_per_epoch=batches_per_epoch
        )
        check_sizes(
            name, 0, num_workers=num_workers, shuffle_buffer=shuffle_buffer, max_bad_samples=max_bad_samples
        )
        self.damage = DamageRegistry()  # shared by the train and val readers and their workers
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.batches_per_epoch = num_workers, batches_per_epoch
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.max_bad_samples, self.pin_memory = max_bad_samples, pin_memory
        self.curriculum = check_curriculum(name, curriculum)

    def dataset(self, shards, train: bool, **reader_kwargs) -> ShardReader:
        """The modality's reader; subclasses call scene_dataset / token_dataset / video_dataset."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement dataset(shards, train, **reader_kwargs)"
        )

    def sample_transform(self, train: bool) -> Callable[[dict], dict] | None:
        """Per-sample transform run in the workers after decoding; must be picklable (a module-level
        function or functools.partial), not a bound method of this module (it holds the trainer)."""
        return None

    def _reader_kwargs(self, train: bool) -> dict:
        return {
            "seed": self.seed,
            "max_bad_samples": self.max_bad_samples,
            "shuffle_buffer": self.shuffle_buffer if train else 0,
            "transform": self.sample_transform(train),
            "registry": self.damage,
        }

    def state_dict(self) -> dict:
        """Checkpoint state: the damaged samples and unreadable shards found so far (the training position
        is saved by the training loader itself, through Lightning's fit loop)."""
        return {"damaged": self.damage.records()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.damage.load(state_dict.get("damaged", []))

    def _global_step(self) -> int | None:
        trainer = self.trainer
        return trainer.global_step if trainer is not None else None

    def train_dataloader(self):
        if self.train_shards is None:
            raise DataConfigError(
                f"{type(self).__name__}: train_shards is not set: pass --data.train_shards=FOLDER (shards written "
                "by `python -m datamodules.prepare`)"
            )
        dataset = self.dataset(self.train_shards, True, **self._reader_kwargs(True))
        if self.curriculum:
            trainer = self.trainer
            max_steps = getattr(trainer, "max_steps", None) if trainer is not None else None
            untils = curriculum_steps(type(self).__name__, self.curriculum, max_steps)
            stages = [
                (until, self.dataset(s["shards"], True, **self._reader_kwargs(True)))
                for until, s in zip(untils, self.curriculum, strict=True)
            ]
            dataset = CurriculumReader([*stages, (None, dataset)])
        return train_loader(
            dataset,
            batch_size=self.batch_size,
            batches_per_epoch=self.batches_per_epoch,
            num_workers=self.num_workers,
            epoch_fn=self._global_step,
            position_fn=lambda: fit_loop_position(self.trainer),
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self):
        if self.val_shards is None:
            return []  # Lightning skips validation when there is no loader
        return self.held_out_loader(self.val_shards)

    def test_dataloader(self):
        """The held-out split scored by `train.py test`: `test_shards` when the subclass has them, else the
        validation shards, read exactly as in validation."""
        shards = getattr(self, "test_shards", None) or self.val_shards
        if shards is None:
            raise DataConfigError(
                f"{type(self).__name__}: set --data.test_shards (or --data.val_shards) to a shard folder to test"
            )
        return self.held_out_loader(shards)

    def held_out_loader(self, shards):
        """A deterministic, finite pass over `shards` (validation and test)."""
        return val_loader(
            self.dataset(shards, False, **self._reader_kwargs(False)),
            batch_size=self.val_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )


class SceneShardDataModule(ShardDataModule):
    """Batches of scenes: ``images`` uint8 [B, V, H, W, 3], ``intrinsics`` [B, V, 4], ``w2c`` [B, V, 4, 4],
    ``key`` and ``shard`` lists. ``num_views`` and ``image_size`` (H, W) are required of every scene."""

    def __init__(
        self, *args, num_views: int | None = None, image_size: tuple[int, int] | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        check_sizes(type(self).__name__, num_views=num_views, image_size=image_size)
        self.num_views, self.image_size = num_views, image_size

    def dataset(self, shards, train: bool, **reader_kwargs) -> ShardReader:
        return scene_dataset(
            shards, train=train, num_views=self.num_views, image_size=self.image_size, **reader_kwargs
        )


class TokenShardDataModule(ShardDataModule):
    """Batches of ``tokens`` int64 [B, seq_len + 1] (inputs ``[:, :-1]``, targets ``[:, 1:]``).

    Token ids must be below ``vocab_limit``; by default the model's vocabulary: the rows of the token
    embedding of the LightningModule being trained (its ``token_embedding()``), so a shard written for a
    larger vocabulary is reported, naming the shard, the id and the vocabulary, instead of crashing inside
    the embedding. meta.json's ``vocab_size``, when present, is checked as well.
    """

    def __init__(self, *args, seq_len: int | None = None, vocab_limit: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        check_sizes(type(self).__name__, seq_len=seq_len, vocab_limit=vocab_limit)
        self.seq_len, self.vocab_limit = seq_len, vocab_limit

    def model_vocab_size(self) -> int | None:
        """``vocab_limit``, else the number of rows of the trained model's token embedding, else None."""
        if self.vocab_limit is not None:
            return self.vocab_limit
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        embedding = getattr(model, "token_embedding", None)
        if callable(embedding):
            return int(embedding().num_embeddings)
        return None

    def dataset(self, shards, train: bool, **reader_kwargs) -> ShardReader:
        length = None if self.seq_len is None else self.seq_len + 1
        return token_dataset(
            shards, train=train, length=length, vocab_size=self.model_vocab_size(), **reader_kwargs
        )


class VideoShardDataModule(ShardDataModule):
    """Batches of ``frames`` uint8 [B, T, H, W, 3] or ``latents`` float16 [B, C, T, h, w], ``caption`` list."""

    def __init__(self, *args, field: str = "frames", shape: Sequence[int | None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        check_sizes(type(self).__name__, shape=list(shape) if shape is not None else None)
        self.field, self.shape = field, shape

    def dataset(self, shards, train: bool, **reader_kwargs) -> ShardReader:
        return video_dataset(shards, train=train, field=self.field, shape=self.shape, **reader_kwargs)

    def predict_dataloader(self):
        """Predict continues the clips of ``val_shards`` (one exact pass)."""
        if self.val_shards is None:
            raise DataConfigError(
                f"{type(self).__name__}: predict reads val_shards, which is not set: pass --data.val_shards=FOLDER"
            )
        return self.val_dataloader()
