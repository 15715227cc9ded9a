"""The layer cases: one FF layer step of each kind on the same shape, and the GEMM floor under them.

A shape ``BxKxN`` is one layer ``K -> N`` fed ``B`` real samples. Every case below processes those
``B`` samples once per call, so time per real sample is ``time / B`` for all of them:

- ``fused-<backend>``: the fused step of an ``FFLinear`` on that backend, called as
  ``functional.ff_step`` calls it (on the layer's weight, bias and optimizer-state buffers): B positive +
  B negative rows, forward, goodness, loss, exact local gradient and the in-place Adam update, in one
  fused op. Not through ``FFLinear.ff_step``, whose non-finite-loss check (``bool(isfinite(loss))``)
  waits for the device every step: on a GPU that would time the host's Python overhead plus the
  kernels back to back, not the step (the whole-network part goes through ``FFNet.ff_step`` and pays it).
- ``labeled-<backend>``: the same for the supervised *first* layer's step (``step_labeled`` of the
  backend, as ``FFLinear.ff_step_labeled`` calls it) on backends that have it: pos and neg are x with a
  label written in, so they share every feature but the label slots and the GEMMs run over B rows
  instead of 2B (same loss, gradient and update as ``fused-<backend>`` on the pair).
- ``reference``: the same FF step with autograd and ``torch.optim.Adam`` (``reference.FFLayerRef``).
- ``bp``: a backprop step of the same layer (same normalization, ``nn.Linear``, ReLU) on the B
  samples, as the *first* layer of a BP network: the input needs no gradient. Loss: the mean over rows
  of the sum of squared outputs (no head, so no GEMM beyond the layer's own). Adam from
  ``reference.make_bp_optimizer`` (foreach on CPU, fused on CUDA).
- ``bp-dx``: the same, as a *hidden* layer of a BP network: also the gradient w.r.t. its input
  (one more GEMM, as every BP layer but the first pays).
- ``floor``: the two GEMMs no FF step can avoid, on preallocated tensors (``torch.mm(out=)``):
  ``z = xhat W^T`` over the 2B rows, and ``dW = G^T xhat``.

With ``--precision bf16`` (float32 parameters) also, side by side with the fp32 cases:

- ``fused-<backend>-bf16`` / ``labeled-<backend>-bf16``: the same steps inside ``torch.autocast(dtype=bfloat16)``
  (bf16 GEMMs, fp32 master weights, state and epilogue; docs/design.md, "Mixed precision"), on the backends that
  have bf16 GEMMs;
- ``floor-bf16``: what such a step cannot avoid: the two GEMMs in bf16 (fp32 accumulation, as ``torch.mm`` on
  bf16 tensors computes them) and the optimizer's pass over the fp32 weight, bias and Adam state (the update op
  of the fused backend, or torch's Adam where none is measured). Its ``ratio_to_floor`` is the bf16 cases' one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .._types import BackendUnavailableError
from ..backends import BACKENDS, available_backends, resolve_backend
from ..backends import reference as ref
from ..backends.contract import autocast_config
from .. import bp, functional
from ..config import FFConfig
from ..labels import wrong_labels
from ..linear import FFLinear

DEFAULT_SHAPES = "256x784x2000,256x2000x2000"
# on a GPU also the large batches where the GEMMs should dominate (4096x2000x2000 is the shape of issue 12's target)
GPU_SHAPES = "256x784x2000,256x2000x2000,4096x2000x2000,4096x4096x4096"
NUM_CLASSES = 10  # label slots of the labeled first-layer case
QUICK_SHAPES = "16x40x24,16x24x24"


@dataclass(frozen=True)
class LayerShape:
    """One layer ``in_features -> out_features`` fed ``batch`` real samples (B pos + B neg rows for FF)."""

    batch: int
    in_features: int
    out_features: int

    def __post_init__(self):
        for nm in ("batch", "in_features", "out_features"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ffkernels bench: {nm} must be a positive int, got {v!r}")

    @classmethod
    def parse(cls, text: str) -> "LayerShape":
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"ffkernels bench: a shape is BxKxN (batch x in_features x out_features, e.g. "
                             f"256x784x2000), got {text!r}")
        return cls(*(int(g) for g in m.groups()))

    def __str__(self) -> str:
        return f"{self.batch}x{self.in_features}x{self.out_features}"


def parse_shapes(text: str) -> list:
    shapes = [LayerShape.parse(s) for s in text.split(",") if s.strip()]
    if not shapes:
        raise ValueError(f"ffkernels bench: no shapes given in {text!r}")
    return shapes


@dataclass(frozen=True)
class LayerCase:
    """A way to take one layer step on B real samples. ``build`` returns the step (a no-argument callable)."""

    name: str
    kind: str           # "fused", "labeled", "reference", "bp", "floor"
    backend: "str | None"
    rows_per_sample: int  # GEMM rows per real sample: 2 for FF (pos + neg), 1 for BP and the labeled step
    build: Callable[[LayerShape, torch.device, torch.dtype], Callable[[], object]]
    min_in_features: int = 1  # the labeled step writes NUM_CLASSES label slots into the input
    precision: str = "fp32"   # bf16: the step runs under torch.autocast(dtype=bfloat16); compared with floor-bf16

    def rows(self, shape: LayerShape) -> int:
        return self.rows_per_sample * shape.batch

    def applies_to(self, shape: LayerShape) -> bool:
        return shape.in_features >= self.min_in_features


def _rand(*size, device, dtype, generator):
    return torch.rand(*size, generator=generator).to(device=device, dtype=dtype)


def _ff_inputs(shape: LayerShape, device, dtype):
    gen = torch.Generator().manual_seed(0)
    x_pos = _rand(shape.batch, shape.in_features, device=device, dtype=dtype, generator=gen)
    x_neg = _rand(shape.batch, shape.in_features, device=device, dtype=dtype, generator=gen)
    return x_pos, x_neg


def _layer_tensors(shape: LayerShape, backend: str, device, dtype):
    """An FFLinear's parameters and optimizer-state buffers (its init, its defaults), for calling a step on them
    directly: (weight, bias, states of weight, states of bias, config)."""
    return step_tensors(FFLinear(shape.in_features, shape.out_features, backend=backend, device=device, dtype=dtype))


def step_tensors(layer):
    """(weight, bias, states of weight, states of bias, config) of an FF layer (FFLinear, FFConv2d), for calling a
    backend's step on them directly."""
    return (layer.weight.detach(), layer.bias.detach(), layer._states("weight"), layer._states("bias"), layer.config)


def _build_fused(backend: str):
    def build(shape: LayerShape, device, dtype):
        w, b, st_w, st_b, cfg = _layer_tensors(shape, backend, device, dtype)
        x_pos, x_neg = _ff_inputs(shape, device, dtype)
        count = [0]

        def step():  # no host synchronization: a non-finite loss skips the update on the device
            count[0] += 1
            return functional.ff_step(x_pos, x_neg, w, b, st_w, st_b, count[0], cfg, backend=backend)
        return step
    return build


def _build_labeled(backend: str):
    def build(shape: LayerShape, device, dtype):
        w, b, st_w, st_b, cfg = _layer_tensors(shape, backend, device, dtype)
        x = _ff_inputs(shape, device, dtype)[0]
        gen = torch.Generator().manual_seed(0)
        labels_pos = torch.randint(0, NUM_CLASSES, (shape.batch,), generator=gen)
        labels_neg = wrong_labels(labels_pos, NUM_CLASSES, generator=gen)
        labels_pos, labels_neg = labels_pos.to(device), labels_neg.to(device)
        step_labeled = BACKENDS[backend].step_labeled
        count = [0]

        def step():  # the call of FFLinear.ff_step_labeled, without its host-side finiteness check
            count[0] += 1
            with torch.no_grad():  # autocast_config: the GEMM dtype of an enclosing torch.autocast, as FFLinear's
                return step_labeled(x, labels_pos, labels_neg, NUM_CLASSES, 1.0, w, b, st_w, st_b, count[0],
                                    autocast_config(cfg, w))
        return step
    return build


def _build_reference(shape: LayerShape, device, dtype):
    # the same layer and options as the fused cases (FFLinear's defaults), trained by autograd + torch.optim
    layer = FFLinear(shape.in_features, shape.out_features, backend="reference", device=device, dtype=dtype)
    oracle = ref.FFLayerRef(layer.weight, layer.bias, layer.config)
    x_pos, x_neg = _ff_inputs(shape, device, dtype)
    return lambda: oracle.step(x_pos, x_neg)


def _build_bp(input_grad: bool):
    def build(shape: LayerShape, device, dtype):
        cfg = FFConfig()  # FFLinear's default normalization, so both layers normalize alike
        linear = nn.Linear(shape.in_features, shape.out_features, device=device, dtype=dtype)
        optimizer = bp.make_bp_optimizer(linear)
        x = _ff_inputs(shape, device, dtype)[0].requires_grad_(input_grad)

        def step():
            optimizer.zero_grad(set_to_none=True)
            x.grad = None
            h = ref.layer_forward(x, linear.weight, linear.bias, cfg.norm, cfg.norm_eps)
            loss = h.square().sum() / shape.batch
            loss.backward()
            optimizer.step()
            return loss.detach()
        return step
    return build


def _build_floor(shape: LayerShape, device, dtype):
    gen = torch.Generator().manual_seed(0)
    rows, k, n = 2 * shape.batch, shape.in_features, shape.out_features
    xhat = _rand(rows, k, device=device, dtype=dtype, generator=gen)
    weight = _rand(n, k, device=device, dtype=dtype, generator=gen)
    grad_z = _rand(rows, n, device=device, dtype=dtype, generator=gen)
    z = torch.empty(rows, n, device=device, dtype=dtype)
    grad_w = torch.empty(n, k, device=device, dtype=dtype)

    def step():
        torch.mm(xhat, weight.t(), out=z)
        torch.mm(grad_z.t(), xhat, out=grad_w)
    return step


def _under_autocast(build):
    """``build`` with its step run inside torch.autocast(dtype=bfloat16) on the tensors' device type."""
    def wrapped(shape: LayerShape, device, dtype):
        step = build(shape, device, dtype)
        device_type = torch.device(device).type

        def autocast_step():
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return step()
        return autocast_step
    return wrapped


def _build_floor_bf16(backend: "str | None"):
    def build(shape: LayerShape, device, dtype):
        gen = torch.Generator().manual_seed(0)
        rows, k, n = 2 * shape.batch, shape.in_features, shape.out_features
        low = torch.bfloat16
        xhat = _rand(rows, k, device=device, dtype=low, generator=gen)
        weight_low = _rand(n, k, device=device, dtype=low, generator=gen)
        grad_z = _rand(rows, n, device=device, dtype=low, generator=gen)
        z = torch.empty(rows, n, device=device, dtype=low)
        grad_w = torch.empty(n, k, device=device, dtype=low)
        w, b, st_w, st_b, cfg = _layer_tensors(shape, backend or "reference", device, dtype)
        gw, gb = torch.rand_like(w), torch.rand_like(b)
        count = [0]
        if backend is None:  # torch's own Adam (foreach=False: one pass per tensor)
            for p, g in ((w, gw), (b, gb)):
                p.grad = g
            adam = torch.optim.Adam([w, b], lr=cfg.lr, foreach=False)

        def step():
            torch.mm(xhat, weight_low.t(), out=z)
            torch.mm(grad_z.t(), xhat, out=grad_w)
            count[0] += 1
            if backend is None:
                adam.step()
            else:
                functional.ff_update(w, b, gw, gb, st_w, st_b, count[0], cfg, backend=backend)
        return step
    return build


REFERENCE = LayerCase("reference", "reference", None, 2, _build_reference)
BP = LayerCase("bp", "bp", None, 1, _build_bp(input_grad=False))
BP_DX = LayerCase("bp-dx", "bp", None, 1, _build_bp(input_grad=True))
FLOOR = LayerCase("floor", "floor", None, 2, _build_floor)


def fused_case(backend: str) -> LayerCase:
    return LayerCase(f"fused-{backend}", "fused", backend, 2, _build_fused(backend))


def labeled_case(backend: str) -> LayerCase:
    return LayerCase(f"labeled-{backend}", "labeled", backend, 1, _build_labeled(backend),
                     min_in_features=NUM_CLASSES)


def fused_bf16_case(backend: str) -> LayerCase:
    return LayerCase(f"fused-{backend}-bf16", "fused", backend, 2, _under_autocast(_build_fused(backend)),
                     precision="bf16")


def labeled_bf16_case(backend: str) -> LayerCase:
    return LayerCase(f"labeled-{backend}-bf16", "labeled", backend, 1, _under_autocast(_build_labeled(backend)),
                     min_in_features=NUM_CLASSES, precision="bf16")


def floor_bf16_case(backends) -> LayerCase:
    """The bf16 floor, its optimizer pass by the first measured bf16 backend's update (torch's Adam without one)."""
    backend = next(iter(backends), None)
    return LayerCase("floor-bf16", "floor", None, 2, _build_floor_bf16(backend), precision="bf16")


def has_bf16_gemms(backend: str) -> bool:
    """Whether ``backend`` runs its FF steps with bf16 GEMMs under torch.autocast."""
    return "bfloat16" in getattr(BACKENDS[backend], "gemm_dtypes", ())


def has_labeled_step(backend: str) -> bool:
    """Whether ``backend`` computes the supervised first layer with shared pos/neg GEMMs (step_labeled)."""
    return callable(getattr(BACKENDS[backend], "step_labeled", None))


def fused_backends(device, dtype, requested=None):
    """(backends to measure, [(backend, why skipped)]) for fused steps on ``device`` and ``dtype``.

    ``requested`` None: every built backend that runs there (the Triton interpreter on a CPU is skipped:
    it is a correctness tool, not a performance one). A requested backend that cannot run raises.
    """
    device = torch.device(device)
    if requested is not None:
        bad = [b for b in requested if b not in BACKENDS or b == "reference"]
        if bad:
            raise ValueError(f"ffkernels bench: unknown fused backend(s) {', '.join(map(repr, bad))}; expected some "
                             f"of {', '.join(repr(b) for b in BACKENDS if b != 'reference')} (the reference FF "
                             "step is always measured, as case 'reference')")
        for b in requested:
            resolve_backend(b, device, dtype)  # raises BackendUnavailableError naming the reason
        return list(requested), []
    chosen, skipped = [], []
    built = available_backends()
    for b in BACKENDS:
        if b == "reference":
            continue
        if b not in built:
            skipped.append((b, BACKENDS[b].unavailable_reason()))
            continue
        if b == "triton" and device.type == "cpu":
            skipped.append((b, "the Triton interpreter on a CPU is not a performance measurement"))
            continue
        try:
            resolve_backend(b, device, dtype)
        except BackendUnavailableError as e:
            skipped.append((b, str(e)))
            continue
        chosen.append(b)
    return chosen, skipped


def layer_cases(backends, bf16: bool = False) -> list:
    """The cases: fused per backend, labeled per backend that has it, reference, bp, bp-dx, floor (in that
    order); with ``bf16`` then fused-<b>-bf16 and labeled-<b>-bf16 per backend with bf16 GEMMs, and floor-bf16.
    ``case.applies_to(shape)`` says whether a case can run on a shape."""
    cases = ([fused_case(b) for b in backends] + [labeled_case(b) for b in backends if has_labeled_step(b)]
             + [REFERENCE, BP, BP_DX, FLOOR])
    if bf16:
        low = [b for b in backends if has_bf16_gemms(b)]
        cases += ([fused_bf16_case(b) for b in low] + [labeled_bf16_case(b) for b in low if has_labeled_step(b)]
                  + [floor_bf16_case(low)])
    return cases
