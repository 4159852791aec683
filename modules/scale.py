"""FSDP2 for every task (docs/architecture.md, Training, checkpoints and scale): one shard unit per block, then the root, inside `configure_model`.

Under Lightning's `ModelParallelStrategy(tensor_parallel_size=1)` a LightningModule's `device_mesh` has a
"data_parallel" dimension; each task's `configure_model` calls `shard_model(self.net, self.net.blocks,
self.device_mesh)`. The same code runs on GPUs with NCCL and on CPU with gloo, which is how it is tested here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

PARAM_DTYPES = (None, "bfloat16", "float16", "float32")


def parse_param_dtype(name: str | None) -> torch.dtype | None:
    """A task's `fsdp_param_dtype` hyperparameter ("bfloat16", ...; None for the parameters' own) as a dtype;
    raises ValueError for anything else, so tasks can check it in __init__ rather than at sharding time."""
    if name not in PARAM_DTYPES:
        raise ValueError(f"fsdp_param_dtype must be one of {PARAM_DTYPES}, got {name!r}")
    return None if name is None else getattr(torch, name)


def shard_model(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    device_mesh: DeviceMesh | None,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    cast_root_inputs: bool = True,
    forward_methods: Iterable[str] = (),
) -> nn.Module:
    """Shard each block and then the root with `fully_shard` over the mesh's data-parallel dimension.

    One unit per block means one all-gather per block in forward and backward, overlapped with the previous
    block's compute, and peak memory of one full block plus the shards. `param_dtype=torch.bfloat16` computes
    in bf16 from fp32 master weights; gradients are reduced in `reduce_dtype`. `cast_root_inputs=False` keeps
    the root's floating-point inputs in their dtype (e.g. cameras, whose rays should be computed in fp32);
    the blocks' inputs are still cast. FSDP gathers a unit's parameters only around `forward`: methods named
    in `forward_methods` (e.g. "reconstruct", "render") are registered as forward methods on every block and
    the root that has them, so they can be called directly on a sharded model. Without a mesh (a single
    process) the model is returned unchanged; an already sharded model is left alone (configure_model may
    run twice).
    """
    if device_mesh is None or isinstance(model, FSDPModule):
        return model
    if "data_parallel" in (device_mesh.mesh_dim_names or ()):
        device_mesh = device_mesh["data_parallel"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    root_policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=cast_root_inputs
    )
    units = [*blocks, model]
    for unit in units:
        fully_shard(unit, mesh=device_mesh, mp_policy=root_policy if unit is model else policy)
    for unit in units:
        for name in forward_methods:
            if hasattr(unit, name):
                register_fsdp_forward_method(unit, name)
    return model
