"""``ffkernels bench``: a quick end-to-end run (JSON structure, machine record, every case ran, the PNG), and
the pieces that can be checked without timing anything: shape parsing, backend choice, the step-count of the
timer, the memory meter and the memory accounting. No assertion here depends on how fast anything ran."""
import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from ffkernels import BackendUnavailableError, available_backends
from ffkernels.bench import memory, report
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


# ---- failures are recorded, results are saved as they come, several dtypes, the targets (issue 12) ----------------

def _fake_case(name, kind="fused", backend=None, build=None):
    from ffkernels.bench.cases import LayerCase

    return LayerCase(name, kind, backend, 2, build or (lambda shape, device, dtype: (lambda: None)))


def _raise_on_call(n, exc):
    """A build whose step raises ``exc`` on its n-th call (1-based)."""
    def build(shape, device, dtype):
        calls = []

        def step():
            calls.append(1)
            if len(calls) == n:
                raise exc
        return step
    return build


def _layer_argv(tmp_path, *extra, shapes="4x12x8,4x12x6"):
    return ["bench", "--device", "cpu", "--no-network", "--shapes", shapes, "--repeats", "2", "--warmup", "1",
            "--min-time", "0", "--no-progress", "--json", str(tmp_path / "b.json"), *extra]


def test_measure_many_records_errors_and_times_the_rest():
    def fail_in_warmup():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    calls = []

    def fail_later():  # warm-up call, repeat 1, then fails in repeat 2
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("boom")
    errors = {}
    fns = {"ok": lambda: None, "oom": fail_in_warmup, "late": fail_later}
    times = measure_many(fns, "cpu", warmup=1, repeats=3, errors=errors)
    assert set(times) == {"ok"} and times["ok"].repeats == 3
    assert errors == {"oom": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", "late": "ValueError: boom"}
    assert set(fns) == {"ok"}  # the failed steps are dropped, so what they hold can be freed
    with pytest.raises(RuntimeError, match="out of memory"):  # without an errors dict a failure propagates
        measure_many({"oom": fail_in_warmup}, "cpu", warmup=1, repeats=1)


def test_a_failing_case_is_recorded_and_the_rest_is_measured(tmp_path, monkeypatch, restore_threads, capsys):
    import ffkernels.bench.layer as layer_mod

    def build_fails(shape, device, dtype):
        raise RuntimeError("triton.compiler.errors.CompilationError: at 12:4")
    cases = [_fake_case("fused-a", backend="a"), _fake_case("fused-b", backend="b", build=build_fails),
             _fake_case("fused-c", backend="c", build=_raise_on_call(3, RuntimeError("CUDA out of memory"))),
             _fake_case("reference", "reference"), _fake_case("floor", "floor")]
    monkeypatch.setattr(layer_mod, "layer_cases", lambda backends: cases)
    with pytest.raises(SystemExit) as exit_info:
        main(_layer_argv(tmp_path, "--markdown", str(tmp_path / "b.md")))
    assert exit_info.value.code == 1  # failures do not stop the run, but the exit status says so
    assert "4 case(s) failed" in capsys.readouterr().err
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["complete"] is True
    rows = {(r["shape"], r["case"]): r for r in result["layer"]["rows"]}
    assert len(rows) == 2 * len(cases)
    for shape in ("4x12x8", "4x12x6"):
        assert rows[shape, "fused-b"]["error"] == "RuntimeError: triton.compiler.errors.CompilationError: at 12:4"
        assert rows[shape, "fused-c"]["error"] == "RuntimeError: CUDA out of memory"
        for case in ("fused-b", "fused-c"):
            assert rows[shape, case]["time"] is None and rows[shape, case]["ratio_to_floor"] is None
        for case in ("fused-a", "reference", "floor"):
            assert "error" not in rows[shape, case] and rows[shape, case]["time"]["repeats"] == 2
        assert rows[shape, "fused-a"]["ratio_to_floor"] > 0
    md = (tmp_path / "b.md").read_text()
    assert "| fused-b | error |" in md and "- fused-c failed: RuntimeError: CUDA out of memory" in md


def test_json_is_rewritten_after_every_shape(tmp_path, monkeypatch, restore_threads):
    import ffkernels.bench.layer as layer_mod

    js = tmp_path / "b.json"
    seen = {}

    def probe(shape, device, dtype):  # what is on disk when each shape's cases are built
        seen[str(shape)] = json.loads(js.read_text()) if js.exists() else None
        return lambda: None
    monkeypatch.setattr(layer_mod, "layer_cases", lambda backends: [_fake_case("fused-a", build=probe),
                                                                    _fake_case("floor", "floor")])
    main(_layer_argv(tmp_path, shapes="4x12x8,4x12x6,4x12x4"))
    assert [seen[s]["complete"] for s in ("4x12x8", "4x12x6", "4x12x4")] == [False] * 3
    assert [len(seen[s]["layer"]["rows"]) for s in ("4x12x8", "4x12x6", "4x12x4")] == [0, 2, 4]
    assert {r["shape"] for r in seen["4x12x4"]["layer"]["rows"]} == {"4x12x8", "4x12x6"}
    final = json.loads(js.read_text())
    assert final["complete"] is True and len(final["layer"]["rows"]) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]  # atomic writes leave no temporary file


def test_an_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch, restore_threads):
    import ffkernels.bench.layer as layer_mod

    def build(shape, device, dtype):
        if shape.out_features == 6:
            raise KeyboardInterrupt  # SIGINT (gpu_check.sh's bound) while the second shape is built
        return lambda: None
    monkeypatch.setattr(layer_mod, "layer_cases", lambda backends: [_fake_case("fused-a", build=build)])
    with pytest.raises(SystemExit) as exit_info:
        main(_layer_argv(tmp_path, "--markdown", str(tmp_path / "b.md")))
    assert exit_info.value.code == 130
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["complete"] is False and "interrupted" in result["interrupted"]
    assert [r["shape"] for r in result["layer"]["rows"]] == ["4x12x8"]
    assert "INCOMPLETE" in (tmp_path / "b.md").read_text()


def test_network_failures_are_recorded_and_saved_per_depth(monkeypatch, restore_threads):
    import ffkernels.bench.network as net_mod

    real_build = net_mod._build

    def build(cfg, x, y):
        if cfg.algo == "ff-labeled" and cfg.depth == 2:
            raise RuntimeError("CUDA out of memory")
        return real_build(cfg, x, y)

    def fake_memory(cfg):  # no worker processes: FF keeps 10 per layer + 5, BP needs 20 more per layer
        persistent = 10 * cfg.depth
        if cfg.algo == "bp" and cfg.depth == 3:
            raise RuntimeError("worker died")
        peak = persistent + (5 if cfg.algo != "bp" else 20 * cfg.depth)
        return {"persistent_bytes": persistent, "peak_alloc_bytes": peak, "peak_rss_bytes": None}
    monkeypatch.setattr(net_mod, "_build", build)
    monkeypatch.setattr(net_mod, "measure_memory_isolated", fake_memory)
    saved = []
    out = net_mod.bench_network([1, 2, 3], width=8, batch=4, in_features=12, device="cpu", dtype="float32",
                                warmup=0, repeats=1, min_time=0, threads=1, progress=False,
                                on_depth=lambda rows: saved.append(len(rows)))
    assert saved == [3, 6, 9]
    rows = {(r["algo"], r["depth"]): r for r in out["rows"]}
    assert rows["ff-labeled", 2]["error"] == "RuntimeError: CUDA out of memory"
    assert rows["ff-labeled", 2]["time"] is None
    assert rows["bp", 3]["error"] == "memory: RuntimeError: worker died" and rows["bp", 3]["samples_per_s"] > 0
    assert rows["ff", 3]["transient_alloc_bytes"] == 5 and rows["bp", 2]["transient_alloc_bytes"] == 40
    growth = out["summary"]["bytes_per_added_layer"]  # failed rows left out of the fits
    assert growth["transient_alloc_bytes"]["ff"] == pytest.approx(0)
    assert growth["transient_alloc_bytes"]["bp"] == pytest.approx(20)
    assert out["summary"]["by_dtype"] == {"float32": growth}


def test_several_dtypes_in_one_run(tmp_path, monkeypatch, restore_threads):
    import ffkernels.bench.layer as layer_mod

    built = []

    def build(shape, device, dtype):
        built.append((str(shape), dtype))
        return lambda: None
    monkeypatch.setattr(layer_mod, "layer_cases", lambda backends: [_fake_case("fused-a", build=build)])
    main(_layer_argv(tmp_path, "--dtype", "float32,bf16"))
    result = json.loads((tmp_path / "b.json").read_text())
    s = result["settings"]
    assert s["dtypes"] == ["float32", "bfloat16"] and s["dtype"] == "float32,bfloat16"
    assert "--dtype float32,bfloat16" in s["command"]
    assert built == [("4x12x8", torch.float32), ("4x12x6", torch.float32), ("4x12x8", torch.bfloat16),
                     ("4x12x6", torch.bfloat16)]  # dtype by dtype
    assert [(r["shape"], r["dtype"]) for r in result["layer"]["rows"]] == [
        ("4x12x8", "float32"), ("4x12x6", "float32"), ("4x12x8", "bfloat16"), ("4x12x6", "bfloat16")]
    by_dtype = result["layer"]["by_dtype"]
    assert set(by_dtype) == {"float32", "bfloat16"}
    if "cpu" in available_backends():  # the C++ kernels are fp32/fp64: skipped in bf16 only
        assert "cpu" in by_dtype["float32"]["backends"] and "cpu" not in by_dtype["bfloat16"]["backends"]
    text = report.text_report(result)
    assert text.count("BP: 4 rows), float32") == 2 and text.count("BP: 4 rows), bfloat16") == 2  # per shape, dtype


def test_dtype_option_and_device_defaults():
    import argparse

    from ffkernels.bench import cli as bench_cli
    from ffkernels.bench.cases import DEFAULT_SHAPES, GPU_SHAPES

    def settings(*argv):
        p = argparse.ArgumentParser()
        bench_cli.add_arguments(p)
        return bench_cli._settings(p.parse_args(list(argv)))
    s = settings("--device", "cpu")
    assert s["dtypes"] == ["float32"] and s["dtype"] == "float32"
    assert s["shapes"] == DEFAULT_SHAPES and s["batch"] == 256  # CPU defaults unchanged
    s = settings("--device", "cuda", "--dtype", "bf16,fp32,bfloat16")
    assert s["dtypes"] == ["bfloat16", "float32"]
    assert s["shapes"] == GPU_SHAPES == "256x784x2000,256x2000x2000,4096x2000x2000,4096x4096x4096"
    assert s["batch"] == 4096
    assert settings("--device", "cuda", "--quick")["shapes"] == QUICK_SHAPES
    assert settings("--device", "cuda", "--shapes", "8x8x8", "--batch", "9")["shapes"] == "8x8x8"
    for bad in ("float33", "", "float32,,nope"):
        with pytest.raises(SystemExit):
            settings("--dtype", bad)


def _target_result(fused_ratios, floor_ok=True, net_rows=None, shape="4096x2000x2000", dtype="bfloat16"):
    floor_ms = 10.0
    rows = [{"shape": shape, "dtype": dtype, "case": "floor", "kind": "floor",
             "time": {"median_ms": floor_ms} if floor_ok else None, "ratio_to_floor": 1.0 if floor_ok else None,
             **({} if floor_ok else {"error": "RuntimeError: CUDA out of memory"})}]
    for case, ratio in fused_ratios.items():
        row = {"shape": shape, "dtype": dtype, "case": case, "kind": case.split("-")[0]}
        if ratio is None:
            row.update(time=None, ratio_to_floor=None, error="CompilationError: x")
        else:
            row.update(time={"median_ms": ratio * floor_ms}, ratio_to_floor=ratio if floor_ok else None)
        rows.append(row)
    return {"settings": {"dtype": dtype}, "layer": {"rows": rows},
            "network": {"rows": net_rows} if net_rows is not None else None}


def _net_rows(ff_per_layer, bp_per_layer, depths=(2, 4, 8), dtype="bfloat16"):
    rows = []
    for d in depths:
        for algo, extra in (("ff", ff_per_layer), ("bp", bp_per_layer)):
            persistent = 40 * 2 ** 20 * d
            rows.append({"algo": algo, "depth": d, "dtype": dtype, "persistent_bytes": persistent,
                         "peak_alloc_bytes": persistent + 30 * 2 ** 20 + extra * d})
    return rows


def test_targets_met_not_met_and_not_measured():
    from ffkernels.bench import targets

    def status(result, target):
        return [(t.get("case") or t.get("dtype"), t["status"]) for t in targets.evaluate(result)
                if t["target"] == target]
    mib = 2 ** 20
    r = _target_result({"fused-cuda": 1.2, "fused-triton": 1.45, "labeled-cuda": 0.7},
                       net_rows=_net_rows(0, 50 * mib))
    assert status(r, "floor") == [("fused-cuda", "met"), ("fused-triton", "not met")]  # labeled-* not a target
    assert status(r, "memory") == [("bfloat16", "met")]
    assert status(_target_result({"fused-cuda": None}), "floor") == [("fused-cuda", "not measured")]
    assert status(_target_result({"fused-cuda": 1.1}, floor_ok=False), "floor") == [("fused-cuda", "not measured")]
    assert status(_target_result({"fused-cuda": 1.0}, shape="256x2000x2000"), "floor") == [(None, "not measured")]
    assert status(_target_result({"fused-cuda": 1.0}, dtype="float32"), "floor") == [(None, "not measured")]
    assert status(_target_result({}), "floor") == [(None, "not measured")]
    assert status(_target_result({}), "memory") == [(None, "not measured")]
    assert status(_target_result({}, net_rows=_net_rows(20 * mib, 50 * mib)), "memory") == [("bfloat16", "not met")]
    assert status(_target_result({}, net_rows=_net_rows(0, 0)), "memory") == [("bfloat16", "not met")]  # BP flat too
    assert status(_target_result({}, net_rows=_net_rows(0, 50 * mib, depths=(4,))), "memory") == [
        ("bfloat16", "not measured")]
    lines = targets.lines(r)
    assert any(line.strip().startswith("MET") and "1.20x the floor" in line for line in lines)
    assert any(line.strip().startswith("NOT MET") and "fused-triton" in line for line in lines)
    md = report.targets_block(r, markdown=True)
    assert "- **met**: fused step <= 1.3x the GEMM floor at 4096x2000x2000 bfloat16" in md


def test_quick_report_shows_the_targets(quick_run):
    text = quick_run[2].read_text()
    assert "targets (issue 12" in text and "**not measured**: fused step <= 1.3x" in text
    assert {t["target"] for t in quick_run[0]["targets"]} == {"floor", "memory"}


def test_cuda_build_check_parses_archs(monkeypatch):
    from ffkernels.bench import machine

    assert machine.parse_archs("8.0;9.0+PTX") == ["8.0", "9.0"]
    assert machine.parse_archs("8.0 9.0a, sm_100") == ["8.0", "9.0", "10.0"]
    assert machine.parse_archs("") == []
    ext = machine._ext
    for loaded, with_cuda, archs, expect in ((False, False, "", "not built"), (True, False, "", "without CUDA"),
                                             (True, True, "8.0;8.6", "not for this GPU's 9.0"),
                                             (True, True, "8.0;9.0", None)):
        monkeypatch.setattr(ext, "loaded", lambda v=loaded: v)
        monkeypatch.setattr(ext, "built_with_cuda", lambda v=with_cuda: v)
        monkeypatch.setattr(ext, "cuda_archs", lambda v=archs: v)
        reason = machine.extension_rebuild_reason((9, 0))
        assert (reason is None) if expect is None else (expect in reason), (archs, reason)



def test_fused_cases_do_not_wait_for_the_device(monkeypatch):
    """fused-*/labeled-* call the backend's step as ffkernels.ff_step does, not FFLinear.ff_step, whose finiteness
    check (bool(isfinite(loss))) synchronizes with a GPU every step."""
    from ffkernels.bench.cases import fused_case, labeled_case
    from ffkernels.linear import FFLinear

    def no_sync(self, loss):
        raise AssertionError("a host-side finiteness check ran")
    monkeypatch.setattr(FFLinear, "_check_finite", no_sync)
    backend = "cpu" if "cpu" in available_backends() else "reference"
    shape = LayerShape(4, 12, 8)
    steps = [fused_case(backend).build(shape, torch.device("cpu"), torch.float32)]
    if has_labeled_step(backend):
        steps.append(labeled_case(backend).build(shape, torch.device("cpu"), torch.float32))
    for step in steps:
        first, second = step(), step()
        assert torch.isfinite(first.loss) and not torch.equal(first.h_pos, second.h_pos)  # it trains


def test_machine_record_of_a_gpu_run(monkeypatch):
    """machine_info's CUDA branch, without a GPU: the device's name, memory, compute capability and whether the
    build has kernels for it."""
    from types import SimpleNamespace

    from ffkernels.bench import machine

    props = SimpleNamespace(name="NVIDIA H200", total_memory=141 * 10 ** 9, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(machine, "extension_rebuild_reason", lambda cap: f"no kernels for {cap}")
    info = machine.machine_info("cuda")
    assert (info["gpu_name"], info["gpu_capability"], info["gpu_memory_bytes"]) == ("NVIDIA H200", "9.0", 141 * 10 ** 9)
    assert info["cuda_build_reason"] == "no kernels for 9.0" and "fp32_matmul_tf32" in info
    assert "GPU NVIDIA H200" in machine.describe(info)


def test_tf32_switch_is_restored():
    from ffkernels.backends.triton import get_fp32_precision
    from ffkernels.bench import cli as bench_cli

    cublas, triton_precision = torch.backends.cuda.matmul.allow_tf32, get_fp32_precision()
    before = bench_cli._set_tf32(True)
    try:
        assert torch.backends.cuda.matmul.allow_tf32 is True and get_fp32_precision() == "tf32"
    finally:
        bench_cli._restore_tf32(before)
    assert (torch.backends.cuda.matmul.allow_tf32, get_fp32_precision()) == (cublas, triton_precision)

# ---- the conv cases (--conv): FFConv2d layer steps against their floor, the competitive conv net vs BPCNN -------------

@pytest.fixture(scope="module")
def conv_quick_run(tmp_path_factory):
    """One `ffkernels bench --conv --quick --precision bf16` run (1 thread, one depth: two fresh worker processes) with
    --json, --plot and --markdown."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("conv_bench")
    js, png, md = out / "bench.json", out / "bench.png", out / "bench.md"
    try:
        main(["bench", "--conv", "--quick", "--device", "cpu", "--threads", "1", "--depths", "1", "--precision",
              "bf16", "--no-progress", "--json", str(js), "--plot", str(png), "--markdown", str(md)])
    finally:
        torch.set_num_threads(n)
    return json.loads(js.read_text()), png, md


def test_conv_quick_runs_every_conv_layer_case(conv_quick_run):
    from ffkernels.bench.conv_cases import CONV_QUICK_SHAPES, parse_conv_shapes

    result = conv_quick_run[0]
    assert result["layer"] is None and result["network"] is None  # --conv measures the conv cases instead
    s = result["settings"]
    assert s["conv"] and s["shapes"] == CONV_QUICK_SHAPES and s["channels"] == [10, 20] and s["image"] == [1, 8, 8]
    assert "--conv" in s["command"] and "--channels 10,20 --image 1x8x8" in s["command"]
    layer = result["conv_layer"]
    fused = [f"fused-{b}" for b in layer["backends"]]
    assert ("fused-cpu" in fused) == ("cpu" in available_backends())
    cases = fused + ["reference", "bp-dx", "floor"] + [f + "-bf16" for f in fused] + ["floor-bf16"]
    shapes = parse_conv_shapes(CONV_QUICK_SHAPES)
    assert {(r["shape"], r["case"]) for r in layer["rows"]} == {(str(sh), c) for sh in shapes for c in cases}
    assert {sh.loss for sh in shapes} == {"competitive", "hinton"}
    for r in layer["rows"]:
        t = r["time"]
        assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"] and t["repeats"] == 2 and "error" not in r
        assert r["samples_per_s"] == pytest.approx(r["batch"] / t["median_s"])
        ff_images = r["batch"] * (2 if r["loss"] == "hinton" else 1)
        assert r["images"] == (r["batch"] if r["kind"] == "bp" else ff_images)
        assert (r["speedup_over_reference"] is not None) == (r["kind"] == "fused")
        assert (r["ff_bp_dx_ratio_per_sample"] is not None) == (r["kind"] in ("fused", "reference"))
        assert (r["ratio_to_floor"] is not None) and (r["kind"] != "floor" or r["ratio_to_floor"] == 1.0)
        assert (r.get("precision") == "bf16") == r["case"].endswith("-bf16")
        assert ("speedup_over_fp32" in r) == (r["case"].endswith("-bf16") and r["kind"] == "fused")


def test_conv_quick_runs_the_conv_net(conv_quick_run):
    net = conv_quick_run[0]["conv_network"]
    assert "profiler" in net["memory_method"]["alloc"] and "RSS" in net["memory_method"]["rss"]
    assert {(r["algo"], r["depth"]) for r in net["rows"]} == {("ff", 1), ("bp", 1)}
    for r in net["rows"]:
        assert r["model"] == "cnn" and r["channels"] == [10, 20] and r["image"] == [1, 8, 8] and r["batch"] == 4
        assert r["threads"] == 1 and r["samples_per_s"] > 0 and "error" not in r
        assert r["peak_alloc_bytes"] >= r["persistent_bytes"] > 0 and r["peak_rss_bytes"] >= 0
    assert {r["algo"]: r["backend"] for r in net["rows"]}["bp"] == "autograd"
    assert [(p["algo"], p["depth"]) for p in net["summary"]["per_depth"]] == [("ff", 1)]


def test_conv_markdown_plot_and_rerendering_from_json(conv_quick_run, tmp_path, capsys):
    result, png, md = conv_quick_run
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    text = md.read_text()
    assert "**conv 1 -> 10, 8x8, k3 p1, B = 4 real images (FF: 4 images, competitive" in text
    assert "**conv 10 -> 20, 6x6, k3 p1, B = 4 real images (FF: 8 images = 4 pos + 4 neg, hinton" in text
    assert "| case | median ms | min-max ms | images/s | x floor | speed-up vs ref | FF/BP-dx per image |" in text
    assert "| floor | " in text and "| bp-dx | " in text and "| floor-bf16 | " in text
    assert "floor: " in text and "GFLOP/s, plus the optimizer's pass" in text
    assert "conv network: 1x8x8 images, depth d = the first d layers of c10-pool-bn-c20-pool-bn" in text  # recipe's
    assert "ff: FFNet of FFConvBlock2d" in text
    assert "| depth | algo |" in text and "targets (issue 12" not in text  # the targets are the linear cases'
    js = tmp_path / "r.json"
    js.write_text(json.dumps(result))
    again = tmp_path / "again.md"
    main(["bench", "--from-json", str(js), "--markdown", str(again), "--plot", str(tmp_path / "again.png")])
    assert again.read_text() == text
    assert "conv network" in capsys.readouterr().out
    assert (tmp_path / "again.png").read_bytes().startswith(PNG_SIGNATURE)


def test_conv_shape_parsing():
    from ffkernels.bench.conv_cases import CONV_SHAPES, ConvShape, parse_conv_shapes

    sh = ConvShape.parse("hinton:128x64x14x14:128")
    assert (sh.loss, sh.batch, sh.in_channels, sh.height, sh.width, sh.out_channels, sh.kernel, sh.padding) == (
        "hinton", 128, 64, 14, 14, 128, 3, 1)
    assert str(sh) == "hinton:128x64x14x14:128k3p1" and ConvShape.parse(str(sh)) == sh and sh.ff_images == 256
    sh = ConvShape.parse("competitive:8x3x9x7:20k5p0")
    assert sh.output_hw == (5, 3) and sh.ff_images == 8 and sh.num_classes == 10
    assert len(parse_conv_shapes(CONV_SHAPES)) == 9
    for bad, message in (("64x1x28x28:40", "LOSS"), ("symba:4x1x8x8:10", "loss is one of"), ("competitive:4x1x8x8:12", "multiple"),
                         ("hinton:4x1x2x2:10k5p0", "larger"), ("hinton:0x1x8x8:10", "batch"), (" , ", "no conv")):
        with pytest.raises(ValueError, match=message):
            parse_conv_shapes(bad)


def test_conv_settings_and_net_configs():
    import argparse

    from ffkernels.bench import cli as bench_cli
    from ffkernels.bench.conv_cases import CONV_SHAPES
    from ffkernels.bench.conv_network import ConvNetConfig
    from ffkernels.bench.network_worker import config_from_json

    def settings(*argv):
        p = argparse.ArgumentParser()
        bench_cli.add_arguments(p)
        return bench_cli._settings(p.parse_args(list(argv)))
    for device in ("cpu", "cuda"):  # the CNN recipe's layers and net on every device
        s = settings("--conv", "--device", device)
        assert (s["shapes"], s["depths"], s["batch"]) == (CONV_SHAPES, [1, 2, 3, 4], 64)
        assert (s["channels"], s["image"]) == ([40, 80, 160, 320], [1, 28, 28]) and "width" not in s
    assert settings("--conv", "--channels", "20,30", "--image", "3x9x9")["image"] == [3, 9, 9]
    with pytest.raises(ValueError, match="--width describes the MLP"):
        settings("--conv", "--width", "8")
    with pytest.raises(ValueError, match="add --conv"):
        settings("--image", "1x8x8")
    cfg = ConvNetConfig("bp", 4, 64)
    assert cfg.describe() == "c40-pool-bn-c80-pool-bn-c160-pool-bn-c320-bn (k3)"  # the recipe's BatchNorm blocks
    assert ConvNetConfig("ff", 3, 64).pools == (0, 1, 2)
    plain = ConvNetConfig("ff", 2, 8, channels=(10, 20), image=(1, 8, 8), conv_block="plain")
    assert plain.describe() == "c10-pool-c20-pool (k3)"
    x, y = plain.make_batch()
    step, _, _ = plain.build(x, y)
    step()
    bn_step, _, _ = dataclasses.replace(plain, conv_block="bn").build(x, y)
    bn_step()
    assert config_from_json(json.dumps(dataclasses.asdict(cfg))) == cfg  # what the memory worker receives
    assert config_from_json(json.dumps(dataclasses.asdict(NetConfig("ff", 1, 8, 4)))) == NetConfig("ff", 1, 8, 4)
    for kw, message in (({"depth": 5}, "needs 5 conv layers"), ({"depth": 2, "channels": (40, 15)}, "multiples"),
                        ({"image": (1, 2, 2)}, "below 1x1"), ({"algo": "ff-labeled"}, "algo"),
                        ({"kernel_size": 4}, "odd"), ({"conv_block": "resnet"}, "conv_block")):
        with pytest.raises(ValueError, match=message):
            ConvNetConfig(**{"algo": "ff", "depth": 4, "batch": 8, **kw})


def test_conv_cases_train_and_a_failing_one_is_recorded(tmp_path, monkeypatch, restore_threads, capsys):
    import ffkernels.bench.conv_layer as conv_layer_mod
    from ffkernels.bench.conv_cases import ConvCase, ConvShape, conv_backends, conv_layer_cases

    backends, _ = conv_backends("cpu", torch.float32)
    shape = ConvShape.parse("competitive:3x2x5x5:10")
    for case in conv_layer_cases(backends):  # every real case steps (and the FF ones train) on this shape
        step = case.build(shape, torch.device("cpu"), torch.float32)
        first, second = step(), step()
        if case.kind in ("fused", "reference"):
            assert torch.isfinite(first.loss) and not torch.equal(first.h_pos, second.h_pos)

    def build_fails(shape, device, dtype):
        raise RuntimeError("no conv kernel for this")
    fake = [ConvCase("fused-a", "fused", "a", lambda shape, device, dtype: (lambda: None)),
            ConvCase("fused-b", "fused", "b", build_fails), ConvCase("floor", "floor", None,
                                                                     lambda shape, device, dtype: (lambda: None))]
    monkeypatch.setattr(conv_layer_mod, "conv_layer_cases", lambda backends, bf16=False: fake)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--conv", "--device", "cpu", "--no-network", "--shapes", "hinton:2x1x4x4:4", "--repeats", "1",
              "--warmup", "0", "--min-time", "0", "--no-progress", "--json", str(tmp_path / "b.json"), "--markdown",
              str(tmp_path / "b.md")])
    assert exit_info.value.code == 1
    assert "conv layer hinton:2x1x4x4:4k3p1 float32 fused-b: RuntimeError: no conv kernel" in capsys.readouterr().err
    rows = {r["case"]: r for r in json.loads((tmp_path / "b.json").read_text())["conv_layer"]["rows"]}
    assert rows["fused-b"]["time"] is None and rows["fused-a"]["ratio_to_floor"] > 0
    assert "| fused-b | error |" in (tmp_path / "b.md").read_text()


# ---- scripts/gpu_check.sh: its time budget, its guard, its phase runner (run here, without a GPU) ------------------

GPU_CHECK = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
needs_bash = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                reason="needs bash and coreutils' timeout")


def _script_bounds() -> dict:
    text = GPU_CHECK.read_text()
    line = re.search(r'^BOUNDS="([^"]*)"$', text, re.M)
    assert line, "gpu_check.sh has no BOUNDS=\"phase=seconds ...\" line"
    return {name: int(sec) for name, sec in (p.split("=") for p in line.group(1).split())}


def test_gpu_check_phase_bounds_fit_one_ten_minute_command():
    text = GPU_CHECK.read_text()
    bounds = _script_bounds()
    assert sum(bounds.values()) <= 540, bounds
    assert int(re.search(r"^TOTAL_LIMIT=(\d+)", text, re.M).group(1)) <= 540
    # every phase the script runs has a budget, and the header comment states the same budgets
    used = set(re.findall(r"^\s*(?:run_phase|pytest_phase|record) ([a-z][a-z-]*) ", text, re.M))
    assert used - {"stop"} == set(bounds), (used, bounds)
    for name, sec in bounds.items():
        assert re.search(rf"^#   {re.escape(name)} +{sec} ", text, re.M), f"header comment lacks '{name} {sec}'"


@needs_bash
def test_gpu_check_syntax_and_plan():
    """--plan prints the budgets and, for each test phase, its case count (collected as on a GPU, not typed) and an
    estimated time inside the phase's budget (scripts/gpu_plan.py); it exits 1 when an estimate is over."""
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    proc = subprocess.run(["bash", str(GPU_CHECK), "--plan"], capture_output=True, text=True)
    plan = proc.stdout
    assert proc.returncode == 0, plan + proc.stderr
    assert f"total               {sum(_script_bounds().values())} (limit 540" in plan
    bounds = _script_bounds()
    for phase in ("tests-cuda", "tests-triton", "tests-gpu-cuda", "tests-gpu-triton"):
        m = re.search(rf"^  {phase} +(\d+) cases  ~ *(\d+) s of (\d+) s$", plan, re.M)
        assert m, f"--plan has no count and estimate for {phase}:\n{plan}"
        n, est, budget = map(int, m.groups())
        assert n > 0 and budget == bounds[phase] and est <= budget, (phase, n, est, budget)
    full = int(re.search(r"^  full-gpu +(\d+) cases", plan, re.M).group(1))
    smoke = sum(int(re.search(rf"^  {p} +(\d+) cases", plan, re.M).group(1))
                for p in ("tests-gpu-cuda", "tests-gpu-triton"))
    assert full > 3 * smoke  # the full suite is the separate, longer command (--full)
    bad = subprocess.run(["bash", str(GPU_CHECK), "--nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


@needs_bash
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the guard of a machine without a GPU")
def test_gpu_check_without_a_gpu_exits_2_after_recording_why(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "torch sees no CUDA GPU" in proc.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert re.match(r"preflight +ok ", summary[1]) and re.match(r"stop +no-gpu ", summary[2])
    assert "GPU: none" in (out / "env.txt").read_text() and (out / "preflight.log").exists()


@needs_bash
def test_gpu_check_phase_runner_bounds_interrupts_and_goes_on(tmp_path):
    """The script's run_phase, sourced: a phase at its bound gets SIGINT (a Python module run like `python -m` under
    the script's SIGINT handler reports, even as a background job that ignores SIGINT), one that ignores SIGINT is
    killed, a failure is recorded, unused time goes to the next phase, and every phase runs."""
    (tmp_path / "sleeper.py").write_text(
        "import sys, time\nprint('started', flush=True)\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
        "    print('interrupted: saving', flush=True)\n    sys.exit(3)\n")
    out = tmp_path / "out"
    out.mkdir()
    script = f"""
        source {shlex.quote(str(GPU_CHECK))}
        OUT={shlex.quote(str(out))}; PYTHON={shlex.quote(sys.executable)}; STATUS=0; T0=$(date +%s)
        BOUNDS="quick=5 sleepy=3 stubborn=3 broken=2"; GRACE=1
        export PYTHONPATH={shlex.quote(str(tmp_path))}
        run_phase quick true
        run_phase sleepy "$PYTHON" -c "$PY_INT" sleeper
        run_phase stubborn bash -c 'trap "" INT; sleep 30'
        run_phase broken false
        echo "STATUS=$STATUS"
    """
    # in the background, as a non-interactive shell starts its jobs: SIGINT ignored unless a handler is installed
    proc = subprocess.run(["bash", "-c", f"bash -c {shlex.quote(script)} & wait $!"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert "STATUS=1" in proc.stdout, proc.stdout + proc.stderr
    lines = {ln.split()[0]: ln.split() for ln in (out / "summary.txt").read_text().splitlines()}
    assert lines["quick"][1] == "ok"
    assert lines["sleepy"][1] == "timeout"
    assert int(lines["sleepy"][4].rstrip("s")) >= 7  # 3 s of its own + what "quick" left of its 5
    assert "interrupted: saving" in (out / "sleepy.log").read_text()
    assert lines["stubborn"][1] == "killed" and lines["broken"][1] == "failed"



# ---- scripts/gpu_sizing.py: the sizing table on paper ----------------------------------------------------------

def test_gpu_sizing_doc_is_generated_from_the_script(monkeypatch):
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "gpu_sizing.py"), "--stdout"], capture_output=True,
                          text=True, check=True)
    assert proc.stdout == (root / "docs" / "gpu-sizing.md").read_text() + "\n", \
        "docs/gpu-sizing.md is stale: run python scripts/gpu_sizing.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_sizing", root / "scripts" / "gpu_sizing.py")
    sizing = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_sizing", sizing)  # dataclasses look their module up there
    spec.loader.exec_module(sizing)
    r = sizing.estimate(4096, 2000, 2000, sizing.MODES[0])  # the target shape in bf16
    assert r["gflop"] == pytest.approx(2 * 2 * 8192 * 2000 * 2000 / 1e9)
    assert r["floor_us"] == pytest.approx(report.floor_flops(4096, 2000, 2000) / 790e12 * 1e6)
    # normalize 2RKe + epilogue 3RNe + the bias partials written and read 2PN4 (P = 512 epilogue blocks of 8 pairs)
    # + Adam NK(3e+16), R = 8192, e = 2; sum_pairs 8B
    assert r["cuda"]["mb"] * 1e6 == pytest.approx(2 * 8192 * 2000 * 2 + 3 * 8192 * 2000 * 2 + 2 * 512 * 2000 * 4
                                                  + 2000 * 2000 * 22 + 8 * 4096)
