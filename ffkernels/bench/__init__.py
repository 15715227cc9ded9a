"""``ffkernels bench``: FF layer steps against the GEMM floor, the autograd reference and BP; whole-network
FF-vs-BP throughput and peak memory as depth grows.

Modules: timing (warm-up, repeats, median/min/max), cases (the layer cases), layer (running them and the
ratios), network (FFNet vs BPMLP training, depth sweep), conv_cases, conv_layer and conv_network (the same for
FFConv2d steps and the competitive conv net vs BPCNN: ``--conv``), network_worker (one configuration's memory in a
fresh process), memory (peak memory per device), machine (what it ran on), report (tables, JSON, plot), cli (the
command).
"""
