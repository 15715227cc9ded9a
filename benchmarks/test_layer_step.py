"""One FF layer step per case (fused per backend, reference, BP, BP with input gradient, GEMM floor),
grouped by shape so they compare side by side. Same cases as ``ffkernels bench`` (ffkernels.bench.cases)."""
from ffkernels.bench.timing import synchronize


def test_layer_step(benchmark, layer_case, bench_device_dtype):
    shape, case = layer_case
    device, dtype = bench_device_dtype
    step = case.build(shape, device, dtype)

    def timed():  # pytest-benchmark reads a host clock: wait for the GPU inside the timed call
        step()
        synchronize(device)

    benchmark.group = f"layer {shape} (B x K x N)"
    benchmark.extra_info.update(case=case.name, kind=case.kind, backend=case.backend, samples=shape.batch,
                                gemm_rows=case.rows(shape))
    benchmark(timed)
