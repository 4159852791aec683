"""56K-token samples streamed through the LM reader with 2 DataLoader workers, exactly."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.readers import token_dataset, train_loader, val_loader
from datamodules.writers import TokenWriter

SEQ_LEN = 56 * 1024  # stored as SEQ_LEN + 1 tokens


def test_56k_token_samples_through_2_workers(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    with TokenWriter(str(tmp_path), samples_per_shard=2) as writer:  # 8 samples in 4 shards
        for i in range(8):
            tokens = rng.integers(0, 50_000, SEQ_LEN + 1).astype(np.uint16)
            writer.write(f"long_{i}", tokens, {"tokenizer": "test", "vocab_size": 50_000})
            written[f"long_{i}"] = torch.from_numpy(tokens.astype(np.int64))

    # Validation: every sample exactly once, every token exact.
    loader = val_loader(token_dataset(tmp_path, train=False, length=SEQ_LEN + 1), batch_size=2, num_workers=2)
    seen = {}
    for batch in loader:
        assert batch["tokens"].shape == (2, SEQ_LEN + 1) and batch["tokens"].dtype == torch.int64
        seen.update(zip(batch["key"], batch["tokens"]))
    assert sorted(seen) == sorted(written)
    assert all(torch.equal(seen[k], written[k]) for k in written)

    # Training: an endless resampled stream, cut at exactly batches_per_epoch batches.
    dataset = token_dataset(tmp_path, train=True, length=SEQ_LEN + 1, shuffle_buffer=2)
    batches = list(train_loader(dataset, batch_size=2, batches_per_epoch=10, num_workers=2))
    assert len(batches) == 10
    for batch in batches:
        for key, tokens in zip(batch["key"], batch["tokens"]):
            assert torch.equal(tokens, written[key])
