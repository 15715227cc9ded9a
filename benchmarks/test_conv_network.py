"""Whole conv-net training step, FF (competitive FFNet of FFConv2d with pooling) vs BP (BPCNN), grouped by depth.
Same steps as ``ffkernels bench --conv`` (ffkernels.bench.conv_network); peak memory is reported by
``ffkernels bench --conv``."""
import torch

from ffkernels.bench.conv_network import ConvNetConfig
from ffkernels.bench.network import build_step
from ffkernels.bench.timing import synchronize


def test_conv_network_step(benchmark, conv_net_case, conv_net_options):
    depth, algo = conv_net_case
    cfg = ConvNetConfig(algo=algo, depth=depth, **conv_net_options)
    device = torch.device(cfg.device)
    step = build_step(cfg)

    def timed():
        step()
        synchronize(device)

    benchmark.group = f"conv network depth {depth}: {cfg.describe()}, batch {cfg.batch}"
    benchmark.extra_info.update(algo=algo, depth=depth, samples=cfg.batch, threads=torch.get_num_threads())
    benchmark(timed)
