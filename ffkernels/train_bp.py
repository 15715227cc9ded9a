"""``ffkernels train --algo bp``: the backprop baseline on the same net, data, batches, epochs and schedule as the
FF run it is compared with (BPMLP: the FFNet's layers, normalization included, plus a linear head, trained end to
end with cross-entropy and Adam). Of the FF recipe only the lr schedule and jitter apply; the rest is FF's own."""
from __future__ import annotations

import torch

from .augment import jitter as augment_jitter
from .bp import BPMLP, bp_step, make_bp_optimizer
from .cnn import BPCNN
from .train_common import lr_schedule, model_dict, run_epochs
from .training import bp_accuracy, run_batches

BP_RECIPE = ("lr_schedule", "jitter")  # the recipe options that apply to BP (train_common.RECIPE_OPTIONS)


def train_bp(args, ds, progress: bool) -> tuple:
    """Train the BP baseline of the parsed ``ffkernels train`` options on ``ds``; print a line per epoch; return
    (the run's result, as the FF run's with ``algo`` "bp"; the model's state_dict)."""
    torch.manual_seed(args.seed)
    cnn = getattr(args, "model", "mlp") == "cnn"
    if cnn:
        model = BPCNN(ds.image_shape, args.channels, args.kernel_size, args.pool_after, ds.num_classes, norm=args.norm,
                      device=args.device, conv_block=args.conv_block)
    else:
        model = BPMLP([ds.in_features, *args.hidden], ds.num_classes, norm=args.norm, device=args.device)
    shape = tuple(ds.image_shape) if cnn else (ds.in_features,)
    opt = make_bp_optimizer(model, lr=args.bp_lr)
    fn = lr_schedule(args, len(ds.y_train))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn) if fn is not None else None
    gen = torch.Generator().manual_seed(args.seed)
    p = next(model.parameters())

    def step(idx):
        xb = ds.x_train[idx].to(p.device, p.dtype, non_blocking=True)
        if args.jitter:
            xb = augment_jitter(xb, ds.image_shape, args.jitter, gen)
        loss = bp_step(model, opt, xb.reshape(-1, *shape), ds.y_train[idx].to(p.device, non_blocking=True))
        if sched is not None:
            sched.step()
        return loss

    hist, seconds = run_epochs(
        args, lambda epoch: run_batches(len(ds.y_train), args.batch_size, gen, step, p.device, progress,
                                        f"epoch {epoch}/{args.epochs}"),
        lambda: bp_accuracy(model, ds.x_test, ds.y_test, shape=shape), ds.eval_split)
    return {"algo": "bp", "dataset": ds.name, "eval_split": ds.eval_split, **model_dict(args),
            "backend": "autograd", "device": str(args.device),
            "threads": torch.get_num_threads(), "bp_lr": args.bp_lr, "batch_size": args.batch_size,
            "seed": args.seed, "recipe": {k: getattr(args, k) for k in BP_RECIPE},
            "test_accuracy": hist.epochs[-1].test_accuracy if hist.epochs else None,
            "wall_seconds": seconds, **hist.to_dict()}, model.state_dict()
