"""Layer-pipelined FF: an FFNet's layers split into contiguous stages, one stage per rank.

Schedule. Stage 0 reads the batches; every stage computes, for each micro-batch of step t, the local
gradient of each of its layers (fused ``ff_grad``) and the activations it hands to its next layer, sends
the last layer's (h_pos, h_neg) to the next stage, and after the step's last micro-batch applies one
fused ``ff_update`` per layer with the micro-batches' gradients summed (weighted by rows: the gradient of
the whole batch). Then it goes straight on to step t+1. Nothing is ever sent backwards.

Why this equals FFNet.ff_step run step after step: in the sequential sweep, layer l+1 at step t learns
from layer l's activations computed with layer l's weights *before* its step-t update; here stage s
computes step t's activations before its own step-t update too, and the next stage uses exactly those.
So stage s working on step t+1 while stage s+1 is still on step t ("staleness") is only an overlap in
wall-clock time, not in the math: the weights after every step are those of the sequential sweep (bit for
bit with one micro-batch; up to rounding of the gradient sum with several). FF tolerates this schedule
because every layer's loss is local: no layer waits for a gradient from above, so unlike backprop
pipelines there is no flush per step and the pipeline stays full from the first step to the last.

Messages per step from stage s to stage s+1 (point-to-point, in order):
  header  int64 [rows]                     rows of the step's batch; 0 means "no more steps"
  per micro-batch: h_pos, h_neg            (rows_m, width of stage s's last layer)
  status  int64 [code, layer]              [0, -1]: every layer so far is finite; [1, l]: layer l's loss
                                           was not finite: stages after it skip the step and stop too
A stage keeps at most ``max_steps_in_flight`` steps of sends outstanding (memory bound); gloo sends wait
for the matching receive, so a fast stage is held back by a slow one instead of queueing without end.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from .._types import NonFiniteLossError
from ..net import FFNet
from ._grads import WeightedGradSum
from .net_sync import broadcast_net, check_same_net, gather_layers
from .process_group import communication, global_rank, require_initialized

_OK, _NONFINITE = 0, 1


def micro_batch_sizes(rows: int, micro_batches: int) -> list:
    """Row counts of the micro-batches of a batch of ``rows`` (as Tensor.tensor_split; never empty ones)."""
    m = min(micro_batches, rows)
    q, r = divmod(rows, m)
    return [q + 1] * r + [q] * (m - r)


def partition_layers(dims: Sequence[int], num_stages: int, balance: Optional[Sequence[int]] = None) -> list:
    """Contiguous layer ranges, one per stage, for a net with widths ``dims`` = [in, w_1, ..., w_L].

    ``balance`` gives the number of layers of each stage; by default the split minimizes the largest
    stage cost, a layer's cost being in_features * out_features (the step's GEMMs and its update all
    scale with it).
    """
    n = len(dims) - 1
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"ffkernels: the number of pipeline stages must be a positive int, got {num_stages!r}")
    if num_stages > n:
        raise ValueError(f"ffkernels: a pipeline of {num_stages} stages needs at least one layer per stage, but the "
                         f"net has {n} layers; use at most {n} processes (or data-parallel training)")
    if balance is not None:
        balance = list(balance)
        if len(balance) != num_stages or any(not isinstance(b, int) or b < 1 for b in balance) or sum(balance) != n:
            raise ValueError(f"ffkernels: balance must be {num_stages} positive layer counts summing to {n}, got "
                             f"{balance}")
    else:
        balance = _balanced_counts([a * b for a, b in zip(dims[:-1], dims[1:])], num_stages)
    starts = [sum(balance[:s]) for s in range(num_stages)]
    return [range(a, a + c) for a, c in zip(starts, balance)]


def _balanced_counts(costs: list, num_stages: int) -> list:
    """Layer counts of the contiguous split of ``costs`` into ``num_stages`` parts with the smallest maximum."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[s][j]: the smallest maximum stage cost splitting the first j layers into s stages; cut[s][j]: last start
    best = [[math.inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], prefix[j] - prefix[i])
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    counts, j = [], n
    for s in range(num_stages, 0, -1):
        counts.append(j - cut[s][j])
        j = cut[s][j]
    return counts[::-1]


class _Outbox:
    """Asynchronous sends to the next stage, with at most ``depth`` steps of them outstanding."""

    def __init__(self, dst: int, group, depth: int):
        self.dst, self.group, self.depth = dst, group, depth
        self.steps = deque()   # per step: [(work, tensor kept alive until sent, what)]
        self.current = []

    def send(self, tensor: torch.Tensor, what: str) -> None:
        tensor = tensor.contiguous()
        with communication(f"sending {what} to rank {self.dst}", self.group):
            self.current.append((dist.isend(tensor, self.dst, group=self.group), tensor, what))

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = []
        while len(self.steps) > self.depth:
            self._wait(self.steps.popleft())

    def flush(self) -> None:
        self.end_step()
        while self.steps:
            self._wait(self.steps.popleft())

    def _wait(self, sends) -> None:
        for work, _, what in sends:
            with communication(f"sending {what} to rank {self.dst}", self.group):
                work.wait()


class PipelineFF:
    """Train an FFNet layer-pipelined over the ranks of a process group: rank s trains stage s.

    Every rank builds the same FFNet (checked); construction copies rank ``src``'s state to all ranks
    (so only ``src`` needs to load a checkpoint). Each rank then trains only its stage's layers (``layer_ids``);
    its copies of the other layers go stale until ``gather_net`` collects the current ones on one rank.
    ``micro_batches`` splits each step's batch so that the next stage can start before this one finishes
    the step; the update still uses the whole batch's gradient.
    """

    def __init__(self, net: FFNet, micro_batches: int = 1, balance: Optional[Sequence[int]] = None,
                 process_group=None, src: int = 0, max_steps_in_flight: int = 2):
        require_initialized("PipelineFF")
        if not isinstance(net, FFNet):
            raise TypeError(f"ffkernels: PipelineFF wraps an FFNet, got {type(net).__name__}")
        for name, v in (("micro_batches", micro_batches), ("max_steps_in_flight", max_steps_in_flight)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ffkernels: {name} must be a positive int, got {v!r}")
        self.net, self.group = net, process_group
        self.micro_batches, self.max_steps_in_flight = micro_batches, max_steps_in_flight
        self.stage, self.num_stages = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.stages = partition_layers(net.dims, self.num_stages, balance)
        self.layer_ids = self.stages[self.stage]
        self.layers = [net.layers[i] for i in self.layer_ids]
        self._prev = global_rank(process_group, self.stage - 1) if self.stage > 0 else None
        self._next = global_rank(process_group, self.stage + 1) if self.stage < self.num_stages - 1 else None
        check_same_net(net, process_group)
        broadcast_net(net, src, process_group)

    @property
    def is_first(self) -> bool:
        return self._prev is None

    @property
    def is_last(self) -> bool:
        return self._next is None

    def _stage_of(self, layer: int) -> int:
        return next(s for s, r in enumerate(self.stages) if layer in r)

    # ---- the schedule -------------------------------------------------------------------------------

    def run(self, batches: Optional[Iterable] = None) -> torch.Tensor:
        """Train on a stream of steps: on stage 0, ``batches`` yields (x_pos, x_neg) of shape (rows, in_features),
        one FF step each; the other stages pass ``None`` and follow the stream until it ends.

        Returns this stage's losses, shape (steps, layers of this stage). If a layer's loss is not finite, its
        stage and every later stage raise NonFiniteLossError (that layer and the later ones skip the step);
        earlier stages, which are never told (nothing flows backwards), fail with DistributedFFError at their
        next send once the failed stage has exited.
        """
        if self.is_first and batches is None:
            raise ValueError("ffkernels: stage 0 (rank 0) reads the data: pass the batches to PipelineFF.run")
        if not self.is_first and batches is not None:
            raise ValueError(f"ffkernels: only stage 0 reads the data; stage {self.stage} receives its inputs from "
                             f"stage {self.stage - 1}: call run() without batches")
        outbox = _Outbox(self._next, self.group, self.max_steps_in_flight) if not self.is_last else None
        source = iter(batches) if self.is_first else None
        losses, step = [], 0
        while True:
            step += 1
            if self.is_first:
                item = next(source, None)
                rows = 0 if item is None else self._check_batch(item, step)
            else:
                rows = self._recv_ints(1, f"the header of step {step}")[0]
            if outbox is not None:
                outbox.send(torch.tensor([rows], dtype=torch.int64, device=self._device), f"the header of step {step}")
            if rows == 0:
                break
            micro = self._split(item, rows) if self.is_first else self._post_recvs(rows, step)
            sums = [WeightedGradSum() for _ in self.layers]
            for m, (x_pos, x_neg) in enumerate(micro):
                frac = 1.0 if x_pos.shape[0] == rows else x_pos.shape[0] / rows
                for acc, layer in zip(sums, self.layers):
                    out = layer.ff_grad(x_pos, x_neg)
                    acc.add(out, frac)
                    x_pos, x_neg = out.h_pos, out.h_neg
                if outbox is not None:
                    outbox.send(x_pos, f"h_pos of step {step}, micro-batch {m}")
                    outbox.send(x_neg, f"h_neg of step {step}, micro-batch {m}")
            upstream = [_OK, -1] if self.is_first else self._recv_ints(2, f"the status of step {step}")
            failed = self._failed_layer(sums, upstream)
            if outbox is not None:  # before updating, so that the next stage can update meanwhile
                status = [_OK, -1] if failed is None else [_NONFINITE, failed]
                outbox.send(torch.tensor(status, dtype=torch.int64, device=self._device), f"the status of step {step}")
                outbox.end_step()
            self._update(sums, failed)
            if failed is not None:
                if outbox is not None:
                    outbox.flush()  # let the later stages learn of the failure before this process raises
                raise NonFiniteLossError(self._failure_message(failed, sums, step))
            losses.append(torch.stack([acc.loss for acc in sums]))
        if outbox is not None:
            outbox.flush()
        if not losses:
            return torch.empty(0, len(self.layers))
        return torch.stack(losses)

    @property
    def _device(self) -> torch.device:
        return self.layers[0].weight.device

    def _check_batch(self, item, step: int) -> int:
        try:
            x_pos, x_neg = item
        except (TypeError, ValueError):
            raise TypeError(f"ffkernels: each batch must be a pair (x_pos, x_neg), got {type(item).__name__} at "
                            f"step {step}") from None
        for name, x in (("x_pos", x_pos), ("x_neg", x_neg)):
            if not isinstance(x, torch.Tensor) or x.dim() != 2:
                raise ValueError(f"ffkernels: {name} of step {step} must be a 2-D tensor (rows, in_features), got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x_pos.shape[0] != x_neg.shape[0] or x_pos.shape[0] == 0:
            raise ValueError(f"ffkernels: step {step}: x_pos and x_neg must have the same, non-zero number of rows, "
                             f"got {x_pos.shape[0]} and {x_neg.shape[0]}")
        return x_pos.shape[0]

    def _split(self, item, rows: int):
        sizes = micro_batch_sizes(rows, self.micro_batches)
        return zip(item[0].split(sizes), item[1].split(sizes))

    def _post_recvs(self, rows: int, step: int):
        """Receive buffers for all micro-batches of the step, posted at once; yields each when it has arrived."""
        k = self.layers[0].in_features
        dtype, posted = self.layers[0].weight.dtype, []
        with communication(f"receiving the activations of step {step} from rank {self._prev}", self.group):
            for b in micro_batch_sizes(rows, self.micro_batches):
                pair = [torch.empty(b, k, dtype=dtype, device=self._device) for _ in range(2)]
                posted.append((pair, [dist.irecv(t, self._prev, group=self.group) for t in pair]))
        for pair, works in posted:
            with communication(f"receiving the activations of step {step} from rank {self._prev}", self.group):
                for w in works:
                    w.wait()
            yield pair

    def _recv_ints(self, n: int, what: str) -> list:
        t = torch.empty(n, dtype=torch.int64, device=self._device)
        with communication(f"receiving {what} from rank {self._prev}", self.group):
            dist.recv(t, self._prev, group=self.group)
        return t.tolist()

    def _failed_layer(self, sums, upstream):
        """The first layer, up to this stage's last, whose step-loss is not finite; None if there is none."""
        if upstream[0] != _OK:
            return upstream[1]
        return next((i for i, acc in zip(self.layer_ids, sums) if not bool(torch.isfinite(acc.loss))), None)

    def _update(self, sums, failed) -> None:
        """The step's fused updates of this stage's layers before ``failed`` (all of them when it is None)."""
        for i, acc, layer in zip(self.layer_ids, sums, self.layers):
            if failed is not None and i >= failed:
                return
            layer.ff_update(*acc.result(layer.weight.dtype))

    def _failure_message(self, failed: int, sums, step: int) -> str:
        first, last = self.layer_ids.start, self.layer_ids.stop - 1
        if failed < first:
            return (f"ffkernels: layer {failed} (stage {self._stage_of(failed)}) had a non-finite loss at step {step} "
                    f"of this run; this stage's layers {first}..{last} skipped that step, as FFNet.ff_step skips the "
                    "layers after a failed one")
        loss = sums[failed - first].loss.item()
        return (f"ffkernels: layer {failed}: the FF loss is not finite ({loss}) at step {step} of this run; layers "
                f"{first}..{failed - 1} of this stage (stage {self.stage}) were updated, layers {failed}..{last} and "
                "the later stages skip the step; the earlier stages, never told since nothing flows backwards, stop "
                "with DistributedFFError once this process exits. Check the inputs, or lower the learning rate.")

    # ---- state --------------------------------------------------------------------------------------

    def gather_net(self, dst: int = 0) -> None:
        """Collect every stage's current layers (weights, optimizer state, step counts) into rank ``dst``'s net,
        e.g. to evaluate it or save ``net.state_dict()`` as a checkpoint. Every rank must call it."""
        gather_layers(self.net, self.layer_ids, dst, self.group)
