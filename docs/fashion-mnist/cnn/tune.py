import sys, time, torch, argparse
from torch import nn
import ffkernels
from ffkernels.data import load_dataset, validation_split
p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=10000); p.add_argument("--epochs", type=int, default=3)
p.add_argument("--ch", default="40,80,160,320"); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--tau", type=float, default=1.0); p.add_argument("--power", type=int, default=2)
p.add_argument("--goodness", default="mean"); p.add_argument("--norm", default="rms")
p.add_argument("--backend", default="cpu"); p.add_argument("--bs", type=int, default=64)
p.add_argument("--pool", default="1,3"); p.add_argument("--bf16", action="store_true"); p.add_argument("--jitter", type=int, default=0)
a = p.parse_args()
torch.manual_seed(0)
ds = validation_split(load_dataset("fashion-mnist"), 10000)
x = ds.x_train[:a.n].view(-1, 1, 28, 28); y = ds.y_train[:a.n]
xv = ds.x_test[:2000].view(-1, 1, 28, 28); yv = ds.y_test[:2000]
ch = [1] + [int(c) for c in a.ch.split(",")]
pools = {int(i) for i in a.pool.split(",")}
mods = []
for i in range(len(ch) - 1):
    mods.append(ffkernels.FFConv2d(ch[i], ch[i+1], 3, padding=1, loss="competitive", num_classes=10, temperature=a.tau,
                                   goodness=a.goodness, goodness_power=a.power, norm=a.norm, lr=a.lr, backend=a.backend))
    if i in pools: mods.append(nn.MaxPool2d(2))
net = ffkernels.FFNet(modules=mods)
g = torch.Generator().manual_seed(0)
ctx = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if a.bf16 else torch.autocast("cpu", enabled=False)
for ep in range(a.epochs):
    t = time.time(); perm = torch.randperm(len(y), generator=g); tot = 0
    with ctx:
        for idx in perm.split(a.bs):
            xb = x[idx]
            if a.jitter:
                from ffkernels.augment import jitter
                xb = jitter(xb.reshape(len(idx), -1), (1, 28, 28), a.jitter, g).view(-1, 1, 28, 28)
            out = net.ff_step_competitive(xb, y[idx]); tot = tot + out.losses
    tt = time.time() - t
    with torch.no_grad():
        accs = []
        scores = [0] * len(net.layers)
        for xb, yb in zip(xv.split(1000), yv.split(1000)):
            hs = net.features(xb)
            for i, h in enumerate(hs):
                scores[i] = scores[i] + (net.layers[i].goodness_of(h).argmax(-1) == yb).sum().item()
        allacc = 0.0
    print(f"ep {ep} {tt:.1f}s loss {[round(v,3) for v in (tot/len(perm.split(a.bs))).tolist()]} per-layer "
          f"{[round(s/len(yv)*100,2) for s in scores]} all {allacc*100:.2f}", flush=True)
