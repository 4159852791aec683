"""FSDP2 for every task (DESIGN §6): one shard unit per block, then the root, inside `configure_model`.

Under Lightning's `ModelParallelStrategy(tensor_parallel_size=1)` a LightningModule's `device_mesh` has a
"data_parallel" dimension; each task's `configure_model` calls `shard_model(self.net, self.net.blocks,
self.device_mesh)`. The same code runs on GPUs with NCCL and on CPU with gloo, which is how it is tested here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def shard_model(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    device_mesh: DeviceMesh | None,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Shard each block and then the root with `fully_shard` over the mesh's data-parallel dimension.

    One unit per block means one all-gather per block in forward and backward, overlapped with the previous
    block's compute, and peak memory of one full block plus the shards. `param_dtype=torch.bfloat16` computes
    in bf16 from fp32 master weights; gradients are reduced in `reduce_dtype`. Without a mesh (a single
    process) the model is returned unchanged; an already sharded model is left alone (configure_model may
    run twice).
    """
    if device_mesh is None or isinstance(model, FSDPModule):
        return model
    if "data_parallel" in (device_mesh.mesh_dim_names or ()):
        device_mesh = device_mesh["data_parallel"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks:
        fully_shard(block, mesh=device_mesh, mp_policy=policy)
    fully_shard(model, mesh=device_mesh, mp_policy=policy)
    return model
