"""Data-parallel FF: every rank steps on its shard of the batch; gradients are averaged before the update.

Per layer, the fused ``ff_grad`` computes the local loss and gradient, one all-reduce sums
``rows * [grad_weight, grad_bias, loss]`` and ``rows`` over the ranks, and the fused ``ff_update``
applies ``sum / total_rows``. Because the FF loss is a mean over the batch, that weighted mean is exactly
the gradient (and loss) of the concatenated batch, whatever the shard sizes (an empty shard adds
nothing). Every rank applies the same reduced gradient, so the weights stay identical.

Layer l+1 learns from layer l's activations computed *before* layer l's update (as in FFNet.ff_step),
so the all-reduce of layer l overlaps the computation of layers l+1, l+2, ...: all reductions are
started asynchronously and waited for once the sweep is done.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from .._types import FFStepOutput, NonFiniteLossError
from ..net import FFNet, FFNetStepOutput
from ._grads import acc_dtype
from .net_sync import broadcast_net, check_same_net
from .process_group import communication, require_initialized


def shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of the rows of ``x`` (sizes differ by at most one; may be empty)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"ffkernels: rank must lie in [0, {world_size}), got {rank}")
    return x.tensor_split(world_size)[rank]


class DataParallelFF:
    """Train an FFNet data-parallel over the ranks of a process group.

    Construction compares every rank's net (shapes, dtype, options: a mismatch raises ValueError on every
    rank) and copies the weights, optimizer state and step counts of rank ``src`` to all others, so the
    ranks start identical (like DistributedDataParallel). ``ff_step`` then keeps them identical.
    """

    def __init__(self, net: FFNet, process_group=None, src: int = 0):
        require_initialized("DataParallelFF")
        if not isinstance(net, FFNet):
            raise TypeError(f"ffkernels: DataParallelFF wraps an FFNet, got {type(net).__name__}")
        self.net, self.group = net, process_group
        self.rank, self.world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        if not 0 <= src < self.world_size:
            raise ValueError(f"ffkernels: src must be a rank in [0, {self.world_size}), got {src}")
        check_same_net(net, process_group)
        broadcast_net(net, src, process_group)

    @property
    def layers(self):
        return self.net.layers

    def ff_step(self, x_pos: torch.Tensor, x_neg: torch.Tensor, return_outputs: bool = False) -> FFNetStepOutput:
        """One data-parallel step on this rank's shard (x_pos, x_neg) of shape (..., in_features).

        Returns the losses of the whole global batch (identical on every rank) and, with ``return_outputs``,
        per layer this shard's activations and goodness with the global loss. If a layer's global loss is not
        finite, every rank raises NonFiniteLossError: earlier layers took their step, that layer and the later
        ones are unchanged, on every rank alike (as FFNet.ff_step does in one process).
        """
        # rows of this shard; None lets ff_grad reject a non-tensor or a scalar with its own message
        rows = math.prod(x_pos.shape[:-1]) if isinstance(x_pos, torch.Tensor) and x_pos.dim() >= 1 else None
        local, pending = [], []
        for i, layer in enumerate(self.net.layers):
            out = layer.ff_grad(x_pos, x_neg) if rows != 0 else None
            buf = self._pack(layer, out, rows)
            with communication(f"all-reducing the gradient of layer {i}", self.group):
                pending.append((buf, dist.all_reduce(buf, group=self.group, async_op=True)))
            h_pos, h_neg = (out.h_pos, out.h_neg) if out is not None else self._empty_h(layer, x_pos)
            local.append((h_pos, h_neg, out))
            x_pos, x_neg = h_pos, h_neg
        reduced = []
        for i, (buf, work) in enumerate(pending):
            with communication(f"all-reducing the gradient of layer {i}", self.group):
                work.wait()
            reduced.append(buf)
        if reduced[0][-1] == 0:
            raise ValueError("ffkernels: the global batch is empty: every rank passed 0 rows")
        losses = []
        for i, (layer, buf) in enumerate(zip(self.net.layers, reduced)):
            grad_w, grad_b, loss = self._unpack(layer, buf)
            try:
                layer.ff_update(grad_w, grad_b, loss=loss)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"ffkernels: layer {i}: {e} (the global batch's loss, on every rank; layers "
                                         f"0..{i - 1} were updated)") from e
            losses.append(loss)
        outputs = None
        if return_outputs:
            outputs = [FFStepOutput(loss, h_pos, h_neg, *self._goodness(out, h_pos))
                       for loss, (h_pos, h_neg, out) in zip(losses, local)]
        return FFNetStepOutput(torch.stack(losses), outputs)

    @staticmethod
    def _pack(layer, out, rows: int) -> torch.Tensor:
        """[rows*grad_weight, rows*grad_bias, rows*loss, rows] in one buffer: one all-reduce per layer."""
        w = layer.weight
        nw, nb = w.numel(), (layer.bias.numel() if layer.bias is not None else 0)
        buf = torch.zeros(nw + nb + 2, dtype=acc_dtype(w.dtype), device=w.device)
        if out is not None:
            buf[:nw].copy_(out.grad_weight.reshape(-1))
            if nb:
                buf[nw:nw + nb].copy_(out.grad_bias)
            buf[-2] = out.loss
            buf[:-1].mul_(rows)
        buf[-1] = rows
        return buf

    @staticmethod
    def _unpack(layer, buf: torch.Tensor):
        mean = buf[:-1].div_(buf[-1])
        w = layer.weight
        nw = w.numel()
        grad_w = mean[:nw].view_as(w).to(w.dtype)
        grad_b = mean[nw:-1].to(w.dtype) if layer.bias is not None else None
        return grad_w, grad_b, mean[-1]

    @staticmethod
    def _empty_h(layer, x: torch.Tensor):
        shape = (*x.shape[:-1], layer.out_features)
        empty = torch.empty(shape, dtype=layer.weight.dtype, device=layer.weight.device)
        return empty, empty.clone()

    @staticmethod
    def _goodness(out: Optional[object], h_pos: torch.Tensor):
        if out is not None:
            return out.g_pos, out.g_neg
        g = h_pos.new_empty(h_pos.shape[:-1])
        return g, g.clone()

    def state_dict(self) -> dict:
        """The wrapped FFNet's state_dict (identical on every rank; save it from rank 0)."""
        return self.net.state_dict()
