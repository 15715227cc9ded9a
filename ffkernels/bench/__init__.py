"""``ffkernels bench``: FF layer steps against the GEMM floor, the autograd reference and BP; whole-network
FF-vs-BP throughput and peak memory as depth grows.

Modules: timing (warm-up, repeats, median/min/max), cases (the layer cases), layer (running them and the
ratios), network (FFNet vs BPMLP training, depth sweep), memory (peak memory per device), machine (what it ran
on), report (tables, JSON, plot), cli (the command).
"""
