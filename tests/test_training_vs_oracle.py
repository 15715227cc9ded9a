"""Training through FFLinear on every kernel backend against the oracle (autograd + torch.optim): odd and even shapes,
every option combination, several steps, float32 and float64 where the backend runs them (tolerance.py). Not the
reference backend: its steps are the oracle's (test_reference_backend.py checks its FFLinear plumbing instead).

How much each backend runs (backends.py): "full" (the C++ and CUDA kernels) every shape and every option pairing;
"reduced" (Triton) each option combination once on shapes that cycle through every size in every dimension (odd and
even, one tile and several), plus the 784-wide shapes."""
import itertools

import pytest

from backends import FP64, KERNELS
from backends import case_params as cases
from options import option_cases, rotating_options
from trajectories import run_and_compare

SIZES_B = (1, 7, 64)
SIZES_KN = (1, 17, 128, 784)
SHAPES = list(itertools.product(SIZES_B, SIZES_KN, SIZES_KN))
# the reduced sweep: every size as B, K and N, odd and even, single- and multi-tile in each dimension (the
# interpreter's tiles are 128 wide, the GPU's 32 or 64); the option cases cycle through the first eight
REDUCED_SHAPES = [(1, 1, 1), (7, 17, 17), (64, 128, 128), (7, 128, 17), (64, 17, 1), (1, 17, 128), (7, 1, 128),
                  (64, 128, 17)]
WIDE_SHAPES = [(7, 784, 17), (7, 17, 784), (64, 784, 784)]


def _shapes(backend, dtype):
    if backend.sweep == "full":
        return [(f"{B}x{K}x{N}", B, K, N, 3) for B, K, N in SHAPES]
    # the reduced shapes run in test_every_option; two steps of the wide ones here
    return [(f"{B}x{K}x{N}", B, K, N, 2) for B, K, N in WIDE_SHAPES]


@pytest.mark.parametrize("backend,dtype,B,K,N,steps", cases(_shapes, KERNELS))
def test_every_shape(backend, dtype, B, K, N, steps):
    cfg, bias = rotating_options(SHAPES.index((B, K, N)))  # the options rotate with the shape
    run_and_compare(backend, B, K, N, steps=steps, bias=bias, dtype=dtype, **cfg)


def _options(backend, dtype):
    if backend.sweep != "full":  # each combination once, on a shape cycling through the reduced sweep's small ones
        shapes = [REDUCED_SHAPES[i % len(REDUCED_SHAPES)] for i in range(len(option_cases(full=False)))]
        return [(f"{cid}-{'x'.join(map(str, shape))}", cfg, bias, shape, 3)
                for (cid, cfg, bias), shape in zip(option_cases(full=False), shapes)]
    if dtype == FP64:  # each combination once, its loss variant and bias cycling (float32 has every pairing)
        return [(cid, cfg, bias, (64, 128, 17), 5) for cid, cfg, bias in option_cases(full=False)]
    return [(cid, cfg, bias, (7, 17, 33), 4) for cid, cfg, bias in option_cases()]


@pytest.mark.parametrize("backend,dtype,cfg,bias,shape,steps", cases(_options, KERNELS))
def test_every_option(backend, dtype, cfg, bias, shape, steps):
    run_and_compare(backend, *shape, steps=steps, dtype=dtype, bias=bias, **cfg)


@pytest.mark.parametrize("backend,dtype", cases(lambda b, dt: [("",)] if b.sweep == "full" else [],
                                                KERNELS))
def test_many_steps_large_layer(backend, dtype):
    """20 steps of a 784 -> 128 layer: errors must not grow into a different trajectory."""
    run_and_compare(backend, 64, 784, 128, steps=20, dtype=dtype)
