"""One FFConv2d step per case (fused per backend, reference, BP with input gradient, the convolution floor), grouped
by conv shape so they compare side by side. Same cases as ``ffkernels bench --conv`` (ffkernels.bench.conv_cases)."""
from ffkernels.bench.timing import synchronize


def test_conv_layer_step(benchmark, conv_layer_case, bench_device_dtype):
    shape, case = conv_layer_case
    device, dtype = bench_device_dtype
    step = case.build(shape, device, dtype)

    def timed():  # pytest-benchmark reads a host clock: wait for the GPU inside the timed call
        step()
        synchronize(device)

    benchmark.group = f"conv layer {shape} (LOSS:BxCxHxW:N)"
    benchmark.extra_info.update(case=case.name, kind=case.kind, backend=case.backend, samples=shape.batch,
                                images=case.images(shape))
    benchmark(timed)
