"""Whole-network training step, FF (FFNet, label in the input) vs BP (same MLP + head), grouped by depth.
Same steps as ``ffkernels bench`` (ffkernels.bench.network); peak memory is reported by ``ffkernels bench``."""
import torch

from ffkernels.bench.network import NetConfig, build_step
from ffkernels.bench.timing import synchronize


def test_network_step(benchmark, net_case, net_options):
    depth, algo = net_case
    cfg = NetConfig(algo=algo, depth=depth, **net_options)
    device = torch.device(cfg.device)
    step = build_step(cfg)

    def timed():
        step()
        synchronize(device)

    benchmark.group = f"network depth {depth} x width {cfg.width}, batch {cfg.batch}"
    benchmark.extra_info.update(algo=algo, depth=depth, samples=cfg.batch, threads=torch.get_num_threads())
    benchmark(timed)
