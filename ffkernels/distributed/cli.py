"""``ffkernels train --distributed data|pipeline``: the train command over the processes torchrun starts.

    torchrun --nproc-per-node 2 -m ffkernels train --distributed data
    torchrun --nproc-per-node 2 -m ffkernels train --distributed pipeline --micro-batches 2

Every rank draws the same batches as single-process ``ffkernels train`` with the same seed (same
permutation, same wrong labels), so both modes train on exactly the single-process data stream. Only rank 0
prints, reads ``--resume`` (the wrappers copy its state to every rank; a file rank 0 cannot load stops every rank
with its one line) and writes ``--save``: a plain FFNet state_dict, the same format as single-process training, so
either kind of run resumes the other.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from ..cli_options import show_progress
from ..data import load_dataset
from ..labels import ff_pair
from ..train_common import build_net, describe, finish, load_checkpoint, resolve_recipe, run_epochs
from ..training import EpochStats, accuracy, progress_iter, train_ff_epoch
from .data_parallel import DataParallelFF, shard
from .pipeline import PipelineFF
from .process_group import communication, init_from_env
from .volume import communication_per_step


class _GlobalBatchStep:
    """What train_ff_epoch needs of a net (``layers``, ``ff_step``), taking the global batch, identical on every
    rank, and stepping data-parallel on this rank's shard of it."""

    def __init__(self, dp: DataParallelFF):
        self.dp, self.layers = dp, dp.layers

    def ff_step(self, x_pos, x_neg):
        r, w = self.dp.rank, self.dp.world_size
        return self.dp.ff_step(shard(x_pos, r, w), shard(x_neg, r, w))


class DataParallelTrainer:
    """Epochs of train_ff_epoch over DataParallelFF; evaluation sharded over the ranks."""

    def __init__(self, net, ctx, args):
        self.net, self.ctx = net, ctx
        self.dp = DataParallelFF(net)

    def epoch(self, ds, batch_size, gen, progress, desc) -> EpochStats:
        return train_ff_epoch(_GlobalBatchStep(self.dp), ds.x_train, ds.y_train, ds.num_classes, batch_size, gen,
                              progress=progress, desc=desc)

    def accuracy(self, ds) -> float:
        """Each rank scores its shard of the test split; the counts are summed."""
        r, w = self.ctx.rank, self.ctx.world_size
        x, y = shard(ds.x_test, r, w), shard(ds.y_test, r, w)
        correct = round(accuracy(self.net, x, y, ds.num_classes) * len(y)) if len(y) else 0
        counts = torch.tensor([correct, len(y)], dtype=torch.float64, device=self.ctx.device)
        with communication("summing the test accuracy"):
            dist.all_reduce(counts)
        return float(counts[0] / counts[1])

    def state_dict(self):
        return self.net.state_dict()


def _ff_batches(ds, batch_size, gen, device, dtype):
    """The (x_pos, x_neg) batches of one epoch, drawn from ``gen`` exactly as training.train_ff_epoch draws them."""
    for idx in torch.randperm(len(ds.y_train), generator=gen).split(batch_size):
        xp, xn = ff_pair(ds.x_train[idx], ds.y_train[idx], ds.num_classes, gen)
        yield xp.to(device, dtype), xn.to(device, dtype)


class PipelineTrainer:
    """Epochs as PipelineFF runs fed by stage 0; evaluation and checkpoints on rank 0 after gathering the layers."""

    def __init__(self, net, ctx, args):
        self.net, self.ctx = net, ctx
        self.pipe = PipelineFF(net, micro_batches=args.micro_batches or 1)

    def epoch(self, ds, batch_size, gen, progress, desc) -> EpochStats:
        batches = None
        if self.pipe.is_first:  # only stage 0 reads the data
            w = self.net.layers[0].weight
            batches = progress_iter(_ff_batches(ds, batch_size, gen, w.device, w.dtype), progress, desc=desc,
                                    leave=False, unit="batch", total=-(-len(ds.y_train) // batch_size))
        t0 = time.perf_counter()
        losses = self.pipe.run(batches)
        with communication("waiting for every stage to finish the epoch"):
            dist.barrier()
        secs = time.perf_counter() - t0
        every = [None] * self.ctx.world_size
        with communication("collecting the losses of every stage"):
            dist.all_gather_object(every, losses.double().mean(0).tolist())
        return EpochStats(0, [v for stage in every for v in stage], secs, len(ds.y_train) / secs)

    def accuracy(self, ds) -> float:
        """Rank 0 gathers the current layers of every stage and scores the whole net."""
        self.pipe.gather_net(0)
        acc = [accuracy(self.net, ds.x_test, ds.y_test, ds.num_classes) if self.ctx.rank == 0 else None]
        with communication("sharing the test accuracy"):
            dist.broadcast_object_list(acc, 0)
        return acc[0]

    def state_dict(self):
        self.pipe.gather_net(0)
        return self.net.state_dict() if self.ctx.rank == 0 else None


TRAINERS = {"data": DataParallelTrainer, "pipeline": PipelineTrainer}


def run(args) -> dict:
    if args.micro_batches is not None and args.distributed != "pipeline":
        raise SystemExit("ffkernels train: --micro-batches only applies to --distributed pipeline")
    # pipeline stages run FFLinear.ff_step, which keeps peer normalization's running mean; data parallelism splits
    # the step into ff_grad + all-reduce + ff_update, which cannot (FFLinear.ff_update refuses it)
    supported = ("peer_norm",) if args.distributed == "pipeline" else ()
    try:
        args.recipe_off = resolve_recipe(args, supported)
    except SystemExit as e:
        raise SystemExit(f"{e} (--distributed {args.distributed})") from None
    if "RANK" not in os.environ:
        raise SystemExit(f"ffkernels train --distributed {args.distributed}: start one process per rank with torchrun, "
                         f"e.g. `torchrun --nproc-per-node 2 -m ffkernels train --distributed {args.distributed} ...` "
                         "(see docs/distributed.md)")
    ctx = init_from_env(args.device, timeout=args.dist_timeout, threads=args.threads)
    try:
        return _train(args, ctx)
    finally:
        dist.destroy_process_group()


def _resume_on_rank0(net, path: str, ctx) -> None:
    """Rank 0 loads the checkpoint (only it needs the file); then every rank learns whether that worked, so a bad
    file stops them all at once with rank 0's one-line reason instead of leaving the others to time out."""
    reason = ""
    if ctx.rank == 0:
        try:
            load_checkpoint(net, path, ctx.device)
        except SystemExit as e:
            reason = str(e)
    shared = [reason]
    dist.broadcast_object_list(shared, src=0, device=ctx.device if ctx.device.type == "cuda" else None)
    if shared[0]:
        raise SystemExit(shared[0])


def _train(args, ctx) -> dict:
    main = ctx.rank == 0
    torch.manual_seed(args.seed)  # the same initial net on every rank (the wrappers also copy rank 0's)
    ds = load_dataset(args.dataset, data_root=args.data_root)
    args.device = str(ctx.device)
    net = build_net(args, ds.in_features)
    if args.resume:
        _resume_on_rank0(net, args.resume, ctx)
    trainer = TRAINERS[args.distributed](net, ctx, args)
    if main:
        extra = f" x {ctx.world_size} processes ({args.distributed}-parallel over {ctx.backend})"
        if args.distributed == "pipeline":
            extra += f", stages {[list(r) for r in trainer.pipe.stages]}, {trainer.pipe.micro_batches} micro-batches"
        sent = communication_per_step(net.dims, args.batch_size, args.distributed, ctx.world_size,
                                      micro_batches=args.micro_batches or 1,
                                      element_size=net.layers[0].weight.element_size())["per_rank"]
        extra += f", {sent / 1e6:.2f} MB sent per rank per step"
        if getattr(args, "recipe_off", None):
            extra += f"; single-process recipe parts off: {' '.join(args.recipe_off)}"
        print(describe(ds, args, net.backend, ctx.device, extra), flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    hist, total = run_epochs(
        args, lambda epoch: trainer.epoch(ds, args.batch_size, gen, main and show_progress(args),
                                          f"epoch {epoch}/{args.epochs}"),
        lambda: trainer.accuracy(ds), verbose=main)
    state = trainer.state_dict() if args.save else None
    result = {"dataset": ds.name, "hidden": args.hidden, "backend": net.backend,
              "device": str(ctx.device), "threads": torch.get_num_threads(), "distributed": args.distributed,
              "world_size": ctx.world_size, "micro_batches": args.micro_batches if args.distributed == "pipeline"
              else None, "test_accuracy": hist.epochs[-1].test_accuracy if hist.epochs else None,
              "wall_seconds": total, **hist.to_dict()}
    return finish(args, result, state) if main else result
