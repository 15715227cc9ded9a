"""``ffkernels bench``: a quick end-to-end run (JSON structure, machine record, every case ran, the PNG), and
the pieces that can be checked without timing anything: shape parsing, backend choice, the step-count of the
timer, the memory meter and the memory accounting. No assertion here depends on how fast anything ran."""
import json

import pytest
import torch

from ffkernels import BackendUnavailableError, available_backends
from ffkernels.bench import memory
from ffkernels.bench.cases import QUICK_SHAPES, LayerShape, fused_backends, has_labeled_step, parse_shapes
from ffkernels.bench.network import NetConfig, measure_memory, summarize, time_configs
from ffkernels.bench.timing import measure, measure_many
from ffkernels.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `ffkernels bench --quick` run (1 thread, one depth: three fresh worker processes) with --json,
    --plot and --markdown."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("bench")
    js, png, md = out / "bench.json", out / "bench.png", out / "bench.md"
    try:
        main(["bench", "--quick", "--device", "cpu", "--threads", "1", "--depths", "2", "--no-progress",
              "--json", str(js), "--plot", str(png), "--markdown", str(md)])
    finally:
        torch.set_num_threads(n)
    return json.loads(js.read_text()), png, md


def test_quick_json_records_machine_and_settings(quick_run):
    result = quick_run[0]
    assert result["schema"] == "ffkernels-bench/1"
    m = result["machine"]
    for key in ("cpu_model", "cpu_count", "torch_threads", "torch", "triton", "gpu_name", "backends", "date"):
        assert key in m, key
    assert m["torch"] == torch.__version__ and m["torch_threads"] == 1 and m["device"] == "cpu"
    assert m["cpu_model"]
    s = result["settings"]
    assert s["quick"] and s["device"] == "cpu" and s["dtype"] == "float32" and s["depths"] == [2]
    assert s["command"].startswith("ffkernels bench --device cpu")


def test_quick_runs_every_layer_case(quick_run):
    result = quick_run[0]
    layer = result["layer"]
    fused = [f"fused-{b}" for b in layer["backends"]]
    labeled = [f"labeled-{b}" for b in layer["backends"] if has_labeled_step(b)]
    assert ("fused-cpu" in fused) == ("cpu" in available_backends())
    cases = fused + labeled + ["reference", "bp", "bp-dx", "floor"]
    expected = {(str(s), c) for s in parse_shapes(QUICK_SHAPES) for c in cases}
    assert {(r["shape"], r["case"]) for r in layer["rows"]} == expected
    for r in layer["rows"]:
        t = r["time"]
        assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"] and t["repeats"] == 2
        assert r["samples_per_s"] == pytest.approx(r["batch"] / (t["median_s"]))
        assert r["gemm_rows"] == (r["batch"] if r["kind"] in ("bp", "labeled") else 2 * r["batch"])
        assert (r["speedup_over_reference"] is not None) == (r["kind"] in ("fused", "labeled"))
        assert (r["ff_bp_ratio_per_sample"] is not None) == (r["kind"] in ("fused", "labeled", "reference"))
        if r["case"] == "floor":
            assert r["ratio_to_floor"] == 1.0
    assert all(isinstance(b, str) and why for b, why in layer["skipped"])


def test_quick_runs_every_network_config(quick_run):
    result = quick_run[0]
    net = result["network"]
    assert "profiler" in net["memory_method"]["alloc"] and "RSS" in net["memory_method"]["rss"]
    assert {(r["algo"], r["depth"]) for r in net["rows"]} == {("ff", 2), ("ff-labeled", 2), ("bp", 2)}
    for r in net["rows"]:
        assert r["threads"] == 1 and r["width"] == 24 and r["in_features"] == 40 and r["samples_per_s"] > 0
        # the allocator sees at least what the model keeps between steps
        assert r["peak_alloc_bytes"] >= r["persistent_bytes"] > 0 and r["peak_rss_bytes"] >= 0
    assert [(p["algo"], p["depth"]) for p in net["summary"]["per_depth"]] == [("ff", 2), ("ff-labeled", 2)]
    # one depth: no slope to fit
    assert net["summary"]["bytes_per_added_layer"]["peak_alloc_bytes"] == {"ff": None, "ff-labeled": None,
                                                                           "bp": None}


def test_quick_plot_is_a_png(quick_run):
    data = quick_run[1].read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_markdown_tables_and_rerendering_from_json(quick_run, tmp_path, capsys):
    result, _, md = quick_run
    text = md.read_text()
    assert "| case | median ms |" in text and "| reference |" in text and "| floor |" in text
    assert "| depth | algo |" in text and f"`{result['settings']['command']}`" in text
    js = tmp_path / "r.json"
    js.write_text(json.dumps(result))
    again = tmp_path / "again.md"
    main(["bench", "--from-json", str(js), "--markdown", str(again)])  # measures nothing
    assert again.read_text() == text
    assert "ffkernels bench on cpu" in capsys.readouterr().out
    js.write_text("{}")
    with pytest.raises(SystemExit, match="not a result"):
        main(["bench", "--from-json", str(js)])


def test_shape_parsing():
    assert parse_shapes("256x784x2000, 8x3x5") == [LayerShape(256, 784, 2000), LayerShape(8, 3, 5)]
    assert str(LayerShape.parse("4X5x6".lower())) == "4x5x6"
    for bad in ("256x784", "axbxc", "0x3x5", ""):
        with pytest.raises(ValueError, match="shape|positive|no shapes"):
            parse_shapes(bad)


def test_backend_choice():
    chosen, skipped = fused_backends("cpu", torch.float32)
    assert set(chosen) | {b for b, _ in skipped} == {"cpu", "cuda", "triton"}
    assert "triton" not in chosen and "cuda" not in chosen
    with pytest.raises(ValueError, match="unknown fused backend.*'nope'"):
        fused_backends("cpu", torch.float32, ["nope"])
    with pytest.raises(ValueError, match="always measured"):
        fused_backends("cpu", torch.float32, ["reference"])
    with pytest.raises(BackendUnavailableError, match="'cuda' is not available"):
        fused_backends("cpu", torch.float32, ["cuda"])
    if "cpu" in available_backends():  # the C++ kernels are fp32/fp64: skipped with a reason in bf16
        chosen, skipped = fused_backends("cpu", torch.bfloat16)
        assert "cpu" not in chosen and any(b == "cpu" and "bfloat16" in why for b, why in skipped)


def test_measure_calls_warmup_plus_repeats_times_number():
    calls = []
    t = measure(lambda: calls.append(1), "cpu", warmup=3, repeats=4)
    assert len(calls) == 3 + 4 and t.number == 1 and t.repeats == 4 and t.clock == "perf_counter"
    calls.clear()
    t = measure(lambda: calls.append(1), "cpu", warmup=0, repeats=2, min_time=1e-3)
    assert t.number >= 1 and len(calls) == 1 + 2 * t.number  # one calibration call, then the repeats
    for bad in ({"repeats": 0}, {"warmup": -1}, {"min_time": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            measure(lambda: None, "cpu", **bad)


def test_measure_many_interleaves_the_repeats():
    calls = []
    times = measure_many({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", warmup=1,
                         repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up of each, then repeat r of every step in turn
    assert set(times) == {"a", "b"} and all(t.repeats == 3 for t in times.values())


def test_time_configs_needs_configs_that_differ_only_in_algo():
    with pytest.raises(ValueError, match="differ only in algo"):
        time_configs([NetConfig("ff", 1, 8, 4, in_features=12), NetConfig("bp", 2, 8, 4, in_features=12)],
                     warmup=0, repeats=1, min_time=0)


@pytest.mark.skipif(memory.rss_unavailable_reason() is not None, reason="needs Linux /proc peak-RSS reset")
def test_peak_rss_sees_an_allocation():
    meter = memory.PeakRSS()
    meter.start()
    x = torch.ones(16 * 2 ** 20)  # 64 MiB, written, so resident
    del x
    assert meter.peak_bytes() >= 60 * 2 ** 20


def test_cpu_allocator_peak_counts_live_tensors():
    def work():
        a = torch.empty(2 ** 20)  # 4 MiB
        b = torch.empty(2 ** 19)  # 2 MiB while a is alive: peak 6 MiB
        del a, b
        c = torch.empty(2 ** 18)  # 1 MiB after both are freed
        return c
    assert memory.cpu_allocator_peak(work) == 6 * 2 ** 20


def test_persistent_memory_accounting(restore_threads):
    k, w, depth = 12, 8, 2
    n_params = (k * w + w) + (depth - 1) * (w * w + w)
    ff = measure_memory(NetConfig("ff", depth, w, 4, in_features=k))
    assert ff["persistent_bytes"] == 3 * 4 * n_params  # fp32 weights + Adam's two states
    bp = measure_memory(NetConfig("bp", depth, w, 4, in_features=k))
    n_tensors = 2 * (depth + 1)  # weight and bias of every layer and of the 10-class head
    # + grads, + the head, + torch.optim.Adam's fp32 "step" scalar per parameter tensor
    assert bp["persistent_bytes"] == 4 * 4 * (n_params + w * 10 + 10) + 4 * n_tensors


def test_summary_fits_memory_growth_per_layer():
    rows = [{"algo": a, "depth": d, "ms_per_sample": (2.0 if a == "ff" else 1.0) * d, "peak_rss_bytes": None,
             "peak_alloc_bytes": (10 if a == "ff" else 30) * d + 5, "persistent_bytes": 7 * d}
            for a in ("ff", "bp") for d in (1, 2, 4)]
    s = summarize(rows)
    growth = s["bytes_per_added_layer"]
    assert growth["peak_alloc_bytes"] == {"ff": pytest.approx(10), "bp": pytest.approx(30)}
    assert growth["persistent_bytes"] == {"ff": pytest.approx(7), "bp": pytest.approx(7)}
    assert growth["peak_rss_bytes"] == {"ff": None, "bp": None}
    assert [(p["algo"], p["depth"]) for p in s["per_depth"]] == [("ff", 1), ("ff", 2), ("ff", 4)]
    assert [p["ff_bp_ratio_per_sample"] for p in s["per_depth"]] == [pytest.approx(2.0)] * 3
    assert [p["ff_bp_peak_alloc_ratio"] for p in s["per_depth"]] == [pytest.approx((10 * d + 5) / (30 * d + 5))
                                                                      for d in (1, 2, 4)]


@pytest.mark.parametrize("argv, message", [
    (["--no-layer", "--no-network"], "nothing to measure"),
    (["--no-network", "--plot", "x.png"], "drop --no-network"),
    (["--shapes", "12x3"], "BxKxN"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--backends", "nope"], "cuda|nope"),
])
def test_cli_bad_options_exit_with_a_message(argv, message, restore_threads):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--quick", "--no-progress", *argv])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="algo"):
        NetConfig("sgd", 1, 8, 4)
    with pytest.raises(ValueError, match="label slots"):
        NetConfig("ff", 1, 8, 4, in_features=5)
    with pytest.raises(ValueError, match="depth"):
        NetConfig("ff", 0, 8, 4)
