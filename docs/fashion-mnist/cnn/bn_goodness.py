"""Issue 20's untried lever, measured before building it into the kernels: the channel-group goodness taken after
max-pooling and a BatchNorm of each block's output (CwComp's block: conv, ReLU, pool, BN; the goodness and the next
block's input are the BN output), against the recipe's block (per-image RMS normalization of the input, goodness on
the conv's ReLU output, the pooled output passed on) in the same plain-autograd loop.

Tuned on the validation split (50,000 / 10,000 of the training images, data.validation_split, the default);
``--split test`` trains on all 60,000 and evaluates on the test split: for the one reported number of a setting.
Each block trains on its own loss with its own Adam (the input detached), cross-entropy over the class groups' mean
h^2 / temperature, the linear cooldown over the run; prediction sums the class-group goodness of --predict-layers.

    python docs/fashion-mnist/cnn/bn_goodness.py --block bn --temperature 0.3 --json bn.json
    python docs/fashion-mnist/cnn/bn_goodness.py --block bn --temperature 0.3 --epochs 15 --split test --seed 0
    python docs/fashion-mnist/cnn/bn_goodness.py --block recipe --temperature 0.3 --json recipe.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from ffkernels.augment import jitter
from ffkernels.data import load_dataset, validation_split
from ffkernels.schedules import linear_cooldown


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, pool: bool, kind: str, classes: int):
        super().__init__()
        self.conv, self.pool, self.kind, self.classes = nn.Conv2d(cin, cout, 3, padding=1), pool, kind, classes
        self.bn = nn.BatchNorm2d(cout) if kind == "bn" else None

    def forward(self, x):
        """(the tensor the goodness is taken of, the block's output)."""
        if self.kind == "recipe":
            x = x / x.pow(2).mean((1, 2, 3), keepdim=True).add(1e-8).sqrt()
        h = F.relu(self.conv(x))
        out = F.max_pool2d(h, 2) if self.pool else h
        if self.bn is None:
            return h, out
        out = self.bn(out)
        return out, out

    def logits(self, src, temperature: float):
        b, c, hh, ww = src.shape
        return src.view(b, self.classes, c // self.classes, hh, ww).pow(2).mean((2, 3, 4)) / temperature


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--block", choices=("bn", "recipe"), default="bn")
    p.add_argument("--channels", type=int, nargs="+", default=[40, 80, 160, 320])
    p.add_argument("--pool-after", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--predict-layers", type=int, nargs="+", default=[-2, -1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jitter", type=int, default=0, help="shift each training image by up to +-K pixels (0: off)")
    p.add_argument("--max-train", type=int, default=None, help="first N training images only (a smoke run)")
    p.add_argument("--split", choices=("validation", "test"), default="validation",
                   help="what to evaluate on (test: train on the whole training split)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    ds = load_dataset("fashion-mnist")
    if a.split == "validation":
        ds = validation_split(ds, 10000)
    shape = (-1, *ds.image_shape)
    x, y = ds.x_train.view(shape)[:a.max_train], ds.y_train[:a.max_train]
    xv, yv = ds.x_test.view(shape), ds.y_test
    chans = [ds.image_shape[0], *a.channels]
    blocks = nn.ModuleList(Block(chans[i], chans[i + 1], i in a.pool_after, a.block, ds.num_classes)
                           for i in range(len(a.channels)))
    opts = [torch.optim.Adam(b.parameters(), lr=a.lr) for b in blocks]
    steps = a.epochs * -(-len(y) // a.batch_size)
    sched = linear_cooldown(steps, 0.5)
    gen = torch.Generator().manual_seed(a.seed)
    history, step = [], 0
    for epoch in range(1, a.epochs + 1):
        blocks.train()
        t0, losses = time.time(), torch.zeros(len(blocks))
        for idx in torch.randperm(len(y), generator=gen).split(a.batch_size):
            h, target = x[idx], y[idx]
            if a.jitter:
                h = jitter(h.flatten(1), ds.image_shape, a.jitter, gen).view(shape)
            for i, (block, opt) in enumerate(zip(blocks, opts)):
                for group in opt.param_groups:
                    group["lr"] = a.lr * sched(step)
                src, out = block(h)
                loss = F.cross_entropy(block.logits(src, a.temperature), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses[i] += loss.item()
                h = out.detach()
            step += 1
        seconds = time.time() - t0
        blocks.eval()
        correct = torch.zeros(len(blocks), dtype=torch.long)
        with torch.no_grad():
            picked = 0
            for xb, yb in zip(xv.split(1000), yv.split(1000)):
                h = xb
                per = []
                for block in blocks:
                    src, h = block(h)
                    per.append(block.logits(src, a.temperature))
                for i, s in enumerate(per):
                    correct[i] += (s.argmax(1) == yb).sum()
                score = sum(per[i] for i in a.predict_layers)
                picked += int((score.argmax(1) == yb).sum())
        acc = picked / len(yv)
        history.append({"epoch": epoch, "loss": (losses / -(-len(y) // a.batch_size)).tolist(),
                        f"{a.split}_accuracy": acc, "per_layer": (correct.double() / len(yv)).tolist(),
                        "seconds": seconds})
        print(f"epoch {epoch}: loss {' '.join(f'{v:.4f}' for v in history[-1]['loss'])}  {a.split} {acc:.2%} "
              f"(per layer {' '.join(f'{v:.2%}' for v in history[-1]['per_layer'])})  {seconds:.0f} s", flush=True)
    result = {"args": vars(a), "epochs": history}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
