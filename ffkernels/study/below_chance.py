"""Why FF's label-in-input prediction falls below chance early in training (issue 21, item 5): the evidence.

The demo's FF setting (784-500-500-500, hinton loss, sum goodness, threshold = width, RMS normalization before every
layer, Adam 3e-3, batch 100) on mnist5k, one thread, seed 0. Three measurements:

1. ``test``: per layer and per epoch, the test accuracy of that layer's goodness alone, the mean rank of the true
   label among the 10 (0 = first) and how often it is ranked last.
2. ``joint`` (FFNet's sweep, every layer stepping on the same batch): per 10 training steps, measured on each batch
   *before* its step — how often layer 1 gives the positive a larger output norm than its negative; how often, after
   the RMS normalization that feeds layer 2, the negative has the larger projection on the batch's mean layer-1
   code; the correlation of layer 2's goodness with that projection; and how often layer 2 ranks the pair right.
3. ``greedy``: the same data, layer 1 trained alone for two epochs and then frozen, layer 2 trained on it: how
   often layer 2 ranks the pair right (before each step).

    python -m ffkernels.study.below_chance --out docs/below-chance
writes results.json and results.md there (about 3 minutes on one core); docs/study.md's ``below-chance`` block is
``markdown(results)`` (study/doc_blocks.py).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from ..data import load_dataset
from ..labels import embed_label, wrong_labels
from ..net import FFNet

C = 10


def pairs(ds, generator, epochs):
    for _ in range(epochs):
        for idx in torch.randperm(len(ds.y_train), generator=generator).split(100):
            x, y = ds.x_train[idx], ds.y_train[idx]
            yield embed_label(x, y, C), embed_label(x, wrong_labels(y, C, generator), C)


def rms(h):
    return h / h.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)


@torch.no_grad()
def test_ranks(net, x, y):
    g = torch.stack([torch.stack([f.pow(2).sum(1) for f in net.features(embed_label(x, torch.full_like(y, c), C))], 1)
                     for c in range(C)], 1)  # (n, label, layer)
    out = []
    for layer in range(g.shape[2]):
        gl = g[:, :, layer]
        rank = (gl > gl.gather(1, y[:, None])).sum(1).float()
        out.append(dict(accuracy=float((gl.argmax(1) == y).float().mean()), mean_rank=float(rank.mean()),
                        ranked_last=float((rank == C - 1).float().mean())))
    return out


def joint(ds, epochs=2):
    torch.manual_seed(0)
    net = FFNet([ds.in_features, 500, 500, 500])
    gen = torch.Generator().manual_seed(1)
    xt, yt = ds.x_test[:1000], ds.y_test[:1000]
    steps, test = [], [dict(epoch=0, layers=test_ranks(net, xt, yt))]
    per_epoch = -(-len(ds.y_train) // 100)
    for i, (xp, xn) in enumerate(pairs(ds, gen, epochs + 1)):
        if i < epochs * per_epoch:
            with torch.no_grad():
                hp, hn = net.layers[0](xp), net.layers[0](xn)
                u = torch.cat([hp, hn]).mean(0)
                u = u / u.norm()
                sp, sn = rms(hp) @ u, rms(hn) @ u
                gp, gn = [net.layers[1](h).pow(2).sum(1) for h in (hp, hn)]
                steps.append(dict(norm_pos_gt_neg=float((hp.norm(dim=1) > hn.norm(dim=1)).float().mean()),
                                  share_neg_gt_pos=float((sn > sp).float().mean()),
                                  corr_goodness_share=float(torch.corrcoef(torch.stack([torch.cat([gp, gn]),
                                                                                       torch.cat([sp, sn])]))[0, 1]),
                                  layer2_right=float((gp > gn).float().mean())))
        net.ff_step(xp, xn)
        if (i + 1) % per_epoch == 0:
            test.append(dict(epoch=(i + 1) // per_epoch, layers=test_ranks(net, xt, yt)))
    return steps, test


def greedy(ds, epochs=2):
    torch.manual_seed(0)
    net = FFNet([ds.in_features, 500, 500])
    gen = torch.Generator().manual_seed(1)
    for xp, xn in pairs(ds, gen, epochs):
        net.layers[0].ff_step(xp, xn)
    right = []
    for xp, xn in pairs(ds, gen, epochs):
        with torch.no_grad():
            hp, hn = net.layers[0](xp), net.layers[0](xn)
            gp, gn = [net.layers[1](h).pow(2).sum(1) for h in (hp, hn)]
        right.append(float((gp > gn).float().mean()))
        net.layers[1].ff_step(hp, hn)
    return right


def blocks(values, size=10):
    return [sum(values[i:i + size]) / len(values[i:i + size]) for i in range(0, len(values), size)]


def markdown(res) -> str:
    keys = ("norm_pos_gt_neg", "share_neg_gt_pos", "corr_goodness_share", "layer2_right")
    lines = ["| steps | layer 1: ‖h⁺‖ > ‖h⁻‖ | after RMS norm: negative's share of the common code larger | "
             "corr(layer-2 goodness, share) | layer 2 ranks the pair right (joint) | layer 2 right (greedy, layer 1 "
             "frozen) |", "|---|---:|---:|---:|---:|---:|"]
    joint_rows = res["joint_steps"]
    greedy_b = blocks(res["greedy_layer2_right"])
    for b in range(len(blocks([r["layer2_right"] for r in joint_rows]))):
        chunk = joint_rows[10 * b:10 * b + 10]
        vals = [sum(r[k] for r in chunk) / len(chunk) for k in keys]
        g = f"{greedy_b[b]:.2f}" if b < len(greedy_b) else "–"
        lines.append(f"| {10 * b}–{10 * b + len(chunk) - 1} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {g} |")
    lines += ["", "| epoch | " + " | ".join(f"layer {i + 1}: acc / mean rank / last" for i in range(3)) + " |",
              "|---|" + "---:|" * 3]
    for t in res["joint_test"]:
        lines.append(f"| {t['epoch']} | " + " | ".join(f"{100 * L['accuracy']:.1f}% / {L['mean_rank']:.2f} / "
                                                     f"{100 * L['ranked_last']:.1f}%" for L in t["layers"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ffkernels.study.below_chance", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="below-chance", help="output folder")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the joint and greedy runs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ds = load_dataset("mnist5k")
    steps, test = joint(ds, args.epochs)
    res = {"setting": "mnist5k, 784-500-500-500, hinton, sum goodness, threshold = width, rms, Adam 3e-3, batch 100, "
                      "seed 0, 1 thread", "joint_steps": steps, "joint_test": test,
           "greedy_layer2_right": greedy(ds, args.epochs)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
