"""Distributed Forward-Forward training on torch.distributed (gloo on CPU, NCCL on GPUs; start with torchrun).

- DataParallelFF: every rank steps on its shard of the batch; per-layer gradients are all-reduced (weighted
  by shard rows) before the fused update, so all ranks keep identical weights.
- PipelineFF: the layers are split into contiguous stages, one per rank; activations flow forward through
  the stages in micro-batches, nothing flows backwards; equal to FFNet.ff_step step after step.
- init_from_env: join the process group torchrun describes (one thread share per process on CPUs).
See docs/distributed.md.
"""
from .data_parallel import DataParallelFF, shard
from .net_sync import broadcast_net, check_same_net, gather_layers
from .pipeline import PipelineFF, micro_batch_sizes, partition_layers
from .process_group import DistContext, DistributedFFError, default_backend, init_from_env
from .volume import communication_per_step

__all__ = ["DataParallelFF", "PipelineFF", "shard", "partition_layers", "micro_batch_sizes", "init_from_env",
           "DistContext", "DistributedFFError", "default_backend", "broadcast_net", "check_same_net", "gather_layers",
           "communication_per_step"]
