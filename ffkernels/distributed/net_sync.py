"""Keeping the ranks' FFNets consistent: compare them, copy one rank's state to all, gather layers to one rank."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._types import dtype_name
from ..net import FFNet
from .process_group import communication, global_rank


def describe_net(net: FFNet) -> list:
    """What must agree between ranks for them to train the same FFNet: shapes, dtype, options."""
    return [{"in": l.in_features, "out": l.out_features, "bias": l.bias is not None,
             "dtype": dtype_name(l.weight.dtype), "config": l.config.to_dict()} for l in net.layers]


def check_same_net(net: FFNet, group=None) -> None:
    """Raise ValueError on every rank unless all ranks hold FFNets of the same shapes, dtype and options."""
    every = [None] * dist.get_world_size(group)
    with communication("comparing the FFNet of every rank", group):
        dist.all_gather_object(every, describe_net(net), group=group)
    for r, theirs in enumerate(every):
        if theirs != every[0]:
            diff = [f"layer {i}: {a} vs {b}" for i, (a, b) in enumerate(zip(every[0], theirs)) if a != b]
            if len(theirs) != len(every[0]):
                diff.insert(0, f"{len(every[0])} vs {len(theirs)} layers")
            raise ValueError(f"ffkernels: rank {r}'s FFNet differs from rank 0's; build the same net on every rank. "
                             f"Differences: {'; '.join(diff)}")


@torch.no_grad()
def broadcast_net(net: FFNet, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s weights, optimizer state and step counts into every rank's ``net``."""
    device = net.layers[0].weight.device
    steps = torch.tensor([l.step_count for l in net.layers], dtype=torch.int64, device=device)
    with communication(f"copying the FFNet state of rank {src}", group):
        for t in net.state_dict(keep_vars=True).values():
            if isinstance(t, torch.Tensor):
                dist.broadcast(t.detach(), global_rank(group, src), group=group)
        dist.broadcast(steps, global_rank(group, src), group=group)
    for layer, s in zip(net.layers, steps.tolist()):
        layer.step_count = s


def gather_layers(net: FFNet, owned, dst: int = 0, group=None) -> None:
    """Load every rank's ``owned`` layers (indices) into rank ``dst``'s ``net``: weights, optimizer state, steps."""
    mine = {i: {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                for k, v in net.layers[i].state_dict().items()} for i in owned}
    rank = dist.get_rank(group)
    every = [None] * dist.get_world_size(group) if rank == dst else None
    with communication(f"gathering the layers of every rank on rank {dst}", group):
        dist.gather_object(mine, every, dst=global_rank(group, dst), group=group)
    if rank == dst:
        for part in every:
            for i, state in part.items():
                if i not in mine:
                    net.layers[i].load_state_dict(state)
