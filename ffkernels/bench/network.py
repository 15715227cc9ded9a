"""Whole-network training, FF vs BP, as depth grows: samples/s and peak training memory.

- ``ff``: supervised Forward-Forward with the label written into the input. One step =
  ``labels.ff_pair`` (positives carry the true label, negatives a wrong one) + ``FFNet.ff_step``
  (every layer's fused step in one sweep). B real samples = B positive + B negative rows.
- ``ff-labeled``: the same training, one step = ``labels.wrong_labels`` + ``FFNet.ff_step_labeled``:
  the first layer shares its GEMMs between pos and neg (B rows, not 2B) where the backend can.
- ``bp``: the same MLP (``reference.BPMLP``: normalization, Linear, ReLU per layer) with a linear head,
  cross-entropy and Adam (``reference.make_bp_optimizer``: foreach on CPU, fused on CUDA), one
  ``reference.bp_step`` on the same B samples.

Peak memory is measured above what the process held just before the model was built (the data batch
is already there), so it counts parameters, optimizer state, gradients and every temporary of
training: at the allocator level on both devices, and as peak RSS on the CPU (memory.py says how).
On the CPU the memory of each configuration is measured in a fresh subprocess
(``python -m ffkernels.bench.network_worker``) so that it owns its RSS high-water mark. Timing runs in
this process, the three algorithms of a depth together with interleaved repeats.

A configuration that fails (building it, a training step or its memory measurement raises: CUDA out of
memory, a Triton compile error, a missing kernel) gets a row with ``error`` and None for what it lacks; the
others are still measured. Rows carry their dtype; the summary is per dtype (``by_dtype``).

The conv net of ``--conv`` (conv_network.py) goes through the same sweep (``bench_depths``): its ConvNetConfig builds
itself (``build``, ``make_batch``, ``tiny``), so the functions here take either kind of configuration.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

from .. import bp
from ..labels import ff_pair, wrong_labels
from ..net import FFNet
from . import memory
from .progress import progress_bar
from .timing import describe_error, measure_many, release_memory

ALGOS = ("ff", "ff-labeled", "bp")
FF_ALGOS = ("ff", "ff-labeled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class NetConfig:
    """One network to train (plain values only: it travels to the memory worker as JSON)."""

    algo: str
    depth: int
    width: int
    batch: int
    in_features: int = 784
    num_classes: int = 10
    device: str = "cpu"
    dtype: str = "float32"
    backend: str = "auto"
    threads: Optional[int] = None

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"ffkernels bench: algo must be one of {ALGOS}, got {self.algo!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ffkernels bench: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for nm in ("depth", "width", "batch", "in_features"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ffkernels bench: {nm} must be a positive int, got {v!r}")
        if self.in_features < self.num_classes:
            raise ValueError(f"ffkernels bench: in_features ({self.in_features}) must hold the {self.num_classes} "
                             "label slots FF writes into the input")

    @property
    def dims(self) -> list:
        return [self.in_features] + [self.width] * self.depth

    def tiny(self) -> "NetConfig":
        """A tiny model of the same kind (see _warm_runtime)."""
        return replace(self, depth=1, width=8)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _build(cfg, x: torch.Tensor, y: torch.Tensor):
    """(step, persistent_bytes, backend): the training step and what its model keeps between steps. A config other
    than a NetConfig (conv_network.ConvNetConfig) builds itself (``cfg.build``)."""
    if not isinstance(cfg, NetConfig):
        return cfg.build(x, y)
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    if cfg.algo in FF_ALGOS:
        net = FFNet(cfg.dims, backend=cfg.backend, device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(0)

        def step():
            if cfg.algo == "ff-labeled":
                return net.ff_step_labeled(x, y, wrong_labels(y, cfg.num_classes, gen), cfg.num_classes).losses
            x_pos, x_neg = ff_pair(x, y, cfg.num_classes, generator=gen)
            return net.ff_step(x_pos, x_neg).losses

        def persistent():  # parameters + optimizer state (FFLinear buffers)
            return _tensor_bytes(list(net.parameters()) + list(net.buffers()))
        return step, persistent, net.backend

    return bp_step_case(bp.BPMLP(cfg.dims, cfg.num_classes, device=device, dtype=dtype), x, y)


def bp_step_case(model, x, y):
    """(step, persistent, "autograd") of a BP model: one Adam cross-entropy step on (x, y), and the bytes it keeps
    between steps (parameters, their .grad, the optimizer state); the MLP and the conv net cases share it."""
    optimizer = bp.make_bp_optimizer(model)

    def step():
        return bp.bp_step(model, optimizer, x, y)

    def persistent():  # parameters + their .grad + optimizer state
        params = list(model.parameters())
        state = [v for s in optimizer.state.values() for v in s.values()]
        return _tensor_bytes(params + [p.grad for p in params] + state)
    return step, persistent, "autograd"


def make_batch(cfg):
    """(x, y): a fixed random batch of ``cfg.batch`` inputs in [0, 1) and labels (a ConvNetConfig: its own)."""
    if not isinstance(cfg, NetConfig):
        return cfg.make_batch()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.batch, cfg.in_features, generator=gen).to(cfg.device, DTYPES[cfg.dtype])
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=gen).to(cfg.device)
    return x, y


def build_step(cfg):
    """The training step of ``cfg`` on its own fixed batch (a no-argument callable)."""
    return _build(cfg, *make_batch(cfg))[0]


MEMORY_STEPS = 3  # steps of each memory measurement (the first one creates the optimizer state)


def _warm_runtime(cfg, x, y) -> None:
    """Two steps of a tiny model of the same kind: the lazy imports, library buffers and threads a first step
    starts (autograd engine, torch.optim, BLAS) are the runtime's memory, not the measured model's."""
    tiny_step = _build(cfg.tiny(), x, y)[0]
    tiny_step(), tiny_step()


def measure_memory(cfg) -> dict:
    """Peak training memory of one configuration, in this process, above what it held before the model:

    ``peak_alloc_bytes`` at the allocator level (tensor bytes), ``peak_rss_bytes`` the process's peak RSS
    (CPU only; meaningful in a fresh process, see measure_memory_isolated), and ``persistent_bytes`` what the
    model keeps between steps. Each over building the model and MEMORY_STEPS training steps.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    x, y = make_batch(cfg)
    _warm_runtime(cfg, x, y)
    meter = memory.CudaPeak(device) if device.type == "cuda" else memory.PeakRSS()
    meter.start()
    step, persistent, _ = _build(cfg, x, y)
    for _ in range(MEMORY_STEPS):
        step()
    peak = meter.peak_bytes()
    result = {"persistent_bytes": persistent()}
    if device.type == "cuda":
        return {**result, "peak_alloc_bytes": peak, "peak_rss_bytes": None}
    del step, persistent
    gc.collect()

    def build_and_train():
        fresh = _build(cfg, x, y)[0]
        for _ in range(MEMORY_STEPS):
            fresh()
    return {**result, "peak_alloc_bytes": memory.cpu_allocator_peak(build_and_train), "peak_rss_bytes": peak}


def time_configs(configs: list, *, warmup: int, repeats: int, min_time: float, errors: "dict | None" = None) -> dict:
    """{algo: (Timing, backend)} for configurations that differ only in ``algo``, on one shared batch, their
    repeats interleaved (timing.measure_many) so that load drifting during the run slows them alike.

    ``errors`` None: a failure propagates. A dict: it gets {algo: error} for every configuration whose build
    or step raised, and the result has no entry for it."""
    cfg0 = configs[0]
    if any(replace(c, algo=cfg0.algo) != cfg0 for c in configs):
        raise ValueError("ffkernels bench: time_configs takes configurations that differ only in algo")
    x, y = make_batch(cfg0)
    built = {}
    for c in configs:
        if errors is None:
            built[c.algo] = _build(c, x, y)
            continue
        try:
            built[c.algo] = _build(c, x, y)
        except Exception as e:  # noqa: BLE001 (recorded in its row; the others go on)
            errors[c.algo] = describe_error(e)
            release_memory(cfg0.device)
    steps = {algo: b[0] for algo, b in built.items()}
    times = measure_many(steps, cfg0.device, warmup=warmup, repeats=repeats, min_time=min_time, errors=errors)
    return {algo: (times[algo], built[algo][2]) for algo in built if algo in times}


def _package_root() -> str:
    import ffkernels

    return os.path.dirname(os.path.dirname(os.path.abspath(ffkernels.__file__)))


def measure_memory_isolated(cfg, timeout: float = 3600) -> dict:
    """``measure_memory`` in a fresh Python process running this same ffkernels."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "ffkernels.bench.network_worker", json.dumps(asdict(cfg))],
                          capture_output=True, text=True, env=env, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"ffkernels bench: the worker for {cfg} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def _linear_slope(xs, ys):
    """Least-squares slope of ys over xs (None with fewer than two distinct xs)."""
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


GROWTH_KEYS = ("peak_alloc_bytes", "peak_rss_bytes", "persistent_bytes", "transient_alloc_bytes")


def _growth(rows: list) -> dict:
    """{measure: {algo: bytes per added layer}} over ``rows`` of one dtype (None where fewer than two depths)."""
    growth = {}
    for key in GROWTH_KEYS:
        growth[key] = {}
        for algo in sorted({r["algo"] for r in rows}, key=ALGOS.index):
            pts = [(r["depth"], r[key]) for r in rows if r["algo"] == algo and r.get(key) is not None]
            growth[key][algo] = _linear_slope([p[0] for p in pts], [p[1] for p in pts]) if pts else None
    return growth


def row_dtype(row: dict, default: str = "float32") -> str:
    """The dtype of a network row (rows of results saved before rows carried it: ``default``)."""
    return row.get("dtype") or default


def summarize(rows: list) -> dict:
    """Per depth, each FF variant against BP: time per real sample and peak memory (allocator) ratios;
    memory growth per added layer (least-squares slope over depth) for each algorithm and measure:
    ``by_dtype`` {dtype: {measure: {algo: slope}}}, and ``bytes_per_added_layer`` the same for the one dtype of a
    single-dtype run (None with several). ``transient_alloc_bytes`` = peak alloc - persistent: what training
    needs beyond what the model keeps between steps (activations, temporaries)."""
    rows = [r for r in rows if not r.get("error")]
    dtypes = list(dict.fromkeys(row_dtype(r) for r in rows))
    by = {(row_dtype(r), r["algo"], r["depth"]): r for r in rows}
    per_depth = []
    for dt in dtypes:
        for d in sorted({r["depth"] for r in rows if row_dtype(r) == dt}):
            bp = by.get((dt, "bp", d))
            for algo in FF_ALGOS:
                ff = by.get((dt, algo, d))
                if ff and bp:
                    entry = {"depth": d, "algo": algo,
                             "ff_bp_ratio_per_sample": _ratio(ff.get("ms_per_sample"), bp.get("ms_per_sample")),
                             "ff_bp_peak_alloc_ratio": _ratio(ff.get("peak_alloc_bytes"), bp.get("peak_alloc_bytes"))}
                    if len(dtypes) > 1 or "dtype" in ff:
                        entry["dtype"] = dt
                    per_depth.append(entry)
    by_dtype = {dt: _growth([r for r in rows if row_dtype(r) == dt]) for dt in dtypes}
    return {"per_depth": per_depth,
            "bytes_per_added_layer": by_dtype[dtypes[0]] if len(dtypes) == 1 else None,
            "by_dtype": by_dtype}


def _ratio(a, b):
    return a / b if a is not None and b else None


def _error_row(cfg, backend, error: str) -> dict:
    return {**asdict(cfg), "backend": backend, "threads": torch.get_num_threads(), "time": None,
            "samples_per_s": None, "ms_per_sample": None, "persistent_bytes": None, "peak_alloc_bytes": None,
            "peak_rss_bytes": None, "transient_alloc_bytes": None, "error": error}


def bench_network(depths, *, width: int, batch: int, in_features: int, device, dtype: str, backend: str = "auto",
                  warmup: int, repeats: int, min_time: float, threads=None, progress: bool = True,
                  on_depth=None) -> dict:
    """FF, FF with the labeled first layer, and BP at every depth: {"memory_method": {"alloc", "rss"}, "rows",
    "summary"}. Per depth the three are timed together in this process (interleaved repeats); then the memory of
    each is measured alone: on the CPU in a fresh subprocess (it owns its RSS high-water mark). A configuration
    that fails gets a row with ``error``. ``on_depth(rows)``, when given, is called after every depth."""
    def configs(depth):
        return [NetConfig(algo=a, depth=depth, width=width, batch=batch, in_features=in_features, device=str(device),
                          dtype=dtype, backend=backend, threads=threads) for a in ALGOS]
    return bench_depths(depths, configs, device=device, dtype=dtype, warmup=warmup, repeats=repeats,
                        min_time=min_time, progress=progress, on_depth=on_depth)


def bench_depths(depths, configs, *, device, dtype: str, warmup: int, repeats: int, min_time: float,
                 progress: bool = True, on_depth=None, desc: str = "networks") -> dict:
    """The depth sweep of ``bench_network`` over ``configs(depth)`` (configurations that differ only in algo, the
    FF ones and "bp"): {"memory_method", "rows", "summary"}."""
    device = torch.device(device)
    isolate = device.type == "cpu"
    if isolate and memory.rss_unavailable_reason():
        raise RuntimeError(f"ffkernels bench: cannot measure CPU memory: {memory.rss_unavailable_reason()} "
                           "(run without the network part: --no-network)")
    rows = []
    plan = [(depth, configs(depth)) for depth in depths]
    with progress_bar(total=sum(1 + len(cs) for _, cs in plan), desc=f"{desc} {dtype}", enabled=progress) as bar:
        for depth, depth_configs in plan:
            bar.set_postfix_str(f"depth {depth}: timing")
            errors = {}
            try:
                timed = time_configs(depth_configs, warmup=warmup, repeats=repeats, min_time=min_time, errors=errors)
            except Exception as e:  # noqa: BLE001 (the shared batch could not be made: every config fails)
                timed = {}
                errors = {c.algo: describe_error(e) for c in depth_configs}
            release_memory(device)
            bar.update()
            for cfg in depth_configs:
                bar.set_postfix_str(f"depth {depth}: memory of {cfg.algo}")
                if cfg.algo not in timed:
                    rows.append(_error_row(cfg, None, errors.get(cfg.algo, "not measured")))
                    bar.update()
                    continue
                t, used_backend = timed[cfg.algo]
                try:
                    mem = measure_memory_isolated(cfg) if isolate else measure_memory(cfg)
                except Exception as e:  # noqa: BLE001
                    release_memory(device)
                    rows.append({**_error_row(cfg, used_backend, f"memory: {describe_error(e)}"),
                                 "time": t.to_dict(), "samples_per_s": cfg.batch / t.median_s,
                                 "ms_per_sample": t.median_s * 1e3 / cfg.batch})
                    bar.update()
                    continue
                transient = (mem["peak_alloc_bytes"] - mem["persistent_bytes"]
                             if mem.get("peak_alloc_bytes") is not None and mem.get("persistent_bytes") is not None
                             else None)
                rows.append({**asdict(cfg), "backend": used_backend, "threads": torch.get_num_threads(),
                             "time": t.to_dict(), "samples_per_s": cfg.batch / t.median_s,
                             "ms_per_sample": t.median_s * 1e3 / cfg.batch, **mem,
                             "transient_alloc_bytes": transient})
                bar.update()
            if on_depth is not None:
                on_depth(rows)
    return {"memory_method": memory.methods(device, MEMORY_STEPS), "rows": rows, "summary": summarize(rows)}
