"""Options and parametrization of the pytest-benchmark suite (not part of the default test run).

    pytest benchmarks/ --benchmark-only                                   # CPU (or the GPU), fp32, default shapes
    pytest benchmarks/ --benchmark-only --ff-device cuda --ff-dtype bfloat16
    pytest benchmarks/ --benchmark-only --ff-shapes 64x784x500 --ff-depths 2 --ff-width 500
    pytest benchmarks/ --benchmark-only -k conv --ff-conv-shapes competitive:64x40x28x28:80 --ff-conv-depths 2

Groups put FF (fused, labeled first layer, reference), BP and the floor of the same shape (or FF, FF with
the labeled first layer and BP of the same depth) side by side; the conv cases (``ffkernels bench --conv``) the
same per conv shape and conv-net depth. Memory is measured by ``ffkernels bench``.
"""
import pytest
import torch

from ffkernels.bench.cases import DEFAULT_SHAPES, fused_backends, layer_cases, parse_shapes
from ffkernels.bench.conv_cases import CONV_SHAPES, conv_backends, conv_layer_cases, parse_conv_shapes
from ffkernels.bench.conv_network import CONV_ALGOS
from ffkernels.bench.network import ALGOS, DTYPES


def pytest_addoption(parser):
    g = parser.getgroup("ffkernels benchmarks")
    g.addoption("--ff-device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                help="device of the ffkernels benchmarks")
    g.addoption("--ff-dtype", default="float32", choices=sorted(DTYPES), help="dtype of the ffkernels benchmarks")
    g.addoption("--ff-backends", default=None, help="comma-separated fused backends (default: every one that runs)")
    g.addoption("--ff-shapes", default=DEFAULT_SHAPES, help="layer shapes BxKxN, comma-separated")
    g.addoption("--ff-depths", default="2,4,8", help="network depths, comma-separated")
    g.addoption("--ff-width", type=int, default=2000, help="network width")
    g.addoption("--ff-batch", type=int, default=256, help="network batch (real samples per step)")
    g.addoption("--ff-conv-shapes", default=CONV_SHAPES, help="conv layer shapes LOSS:BxCxHxW:N, comma-separated")
    g.addoption("--ff-conv-depths", default="1,2,3,4", help="conv net depths (the first d layers of 40,80,160,320)")
    g.addoption("--ff-conv-batch", type=int, default=64, help="conv net batch (images per step)")
    g.addoption("--ff-threads", type=int, default=None, help="torch.set_num_threads")


def _device_dtype(config):
    device = torch.device(config.getoption("--ff-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--ff-device cuda, but no CUDA GPU is available")
    return device, DTYPES[config.getoption("--ff-dtype")]


def pytest_configure(config):
    threads = config.getoption("--ff-threads", default=None)
    if threads:
        torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "layer_case" in metafunc.fixturenames:
        device, dtype = _device_dtype(config)
        requested = config.getoption("--ff-backends")
        backends, _ = fused_backends(device, dtype, requested.split(",") if requested else None)
        params = [(shape, case) for shape in parse_shapes(config.getoption("--ff-shapes"))
                  for case in layer_cases(backends) if case.applies_to(shape)]
        metafunc.parametrize("layer_case", params, ids=[f"{s}-{c.name}" for s, c in params])
    if "net_case" in metafunc.fixturenames:
        depths = [int(d) for d in config.getoption("--ff-depths").split(",") if d.strip()]
        params = [(d, a) for d in depths for a in ALGOS]
        metafunc.parametrize("net_case", params, ids=[f"depth{d}-{a}" for d, a in params])
    if "conv_layer_case" in metafunc.fixturenames:
        device, dtype = _device_dtype(config)
        requested = config.getoption("--ff-backends")
        backends, _ = conv_backends(device, dtype, requested.split(",") if requested else None)
        params = [(shape, case) for shape in parse_conv_shapes(config.getoption("--ff-conv-shapes"))
                  for case in conv_layer_cases(backends)]
        metafunc.parametrize("conv_layer_case", params, ids=[f"{s}-{c.name}" for s, c in params])
    if "conv_net_case" in metafunc.fixturenames:
        depths = [int(d) for d in config.getoption("--ff-conv-depths").split(",") if d.strip()]
        params = [(d, a) for d in depths for a in CONV_ALGOS]
        metafunc.parametrize("conv_net_case", params, ids=[f"conv-depth{d}-{a}" for d, a in params])


@pytest.fixture
def bench_device_dtype(request):
    return _device_dtype(request.config)


@pytest.fixture
def net_options(request):
    c = request.config
    device, _ = _device_dtype(c)
    return {"width": c.getoption("--ff-width"), "batch": c.getoption("--ff-batch"), "device": str(device),
            "dtype": c.getoption("--ff-dtype")}


@pytest.fixture
def conv_net_options(request):
    c = request.config
    device, _ = _device_dtype(c)
    return {"batch": c.getoption("--ff-conv-batch"), "device": str(device), "dtype": c.getoption("--ff-dtype")}
