"""``sample_inputs(op, device, dtype)``: argument sets for every op the backends register.

Shared by the op-level correctness tests (test_ops_vs_oracle.py, test_split_step.py: through the functional API,
ffkernels.ff_grad / ff_update / ff_step), the opcheck tests (test_opcheck.py) and torch.compile
(test_torch_compile.py): both through torch.ops, as ``sample.args(op)``. The registered schemas, the same for
torch.ops.ffkernels (python_api/ff_api.cpp) and torch.ops.ffkernels_triton:

    ff_grad(x_pos, x_neg, weight, bias?, peer_mean?, str options)
        -> (loss, h_pos, h_neg, g_pos, g_neg, grad_weight, grad_bias)
    ff_update(weight!, bias!?, grad_weight, grad_bias?, state1_weight!?, state2_weight!?, state1_bias!?,
              state2_bias!?, loss?, int step, str options) -> ()
    ff_step(x_pos, x_neg, weight!, bias!?, state1_weight!?, state2_weight!?, state1_bias!?, state2_bias!?, peer_mean!?,
            int step, str options) -> (loss, h_pos, h_neg, g_pos, g_neg)
    ff_grad_labeled(x, label_pos, label_neg, int num_classes, float label_value, weight, bias?, peer_mean?,
                    str options)
    ff_step_labeled(x, label_pos, label_neg, int num_classes, float label_value, weight!, bias!?, state1_weight!?,
                    state2_weight!?, state1_bias!?, state2_bias!?, peer_mean!?, int step, str options)

``options`` is FFConfig.op_options; unused state slots are None; peer_mean (peer normalization's running mean r)
is given exactly when the configuration has peer_norm > 0 (the first two: with and without bias, Adam and SGD with
momentum, mu > 0 and mu = 0; and the scff one); in the strided sample of the ops that only read it, it is strided too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from backends import state_dtype
from ffkernels import FFConfig

ARGS = {  # each op's arguments in schema order
    "ff_grad": ("x_pos", "x_neg", "weight", "bias", "peer_mean", "options"),
    "ff_update": ("weight", "bias", "grad_weight", "grad_bias", "state1_weight", "state2_weight", "state1_bias",
                  "state2_bias", "loss", "step", "options"),
    "ff_step": ("x_pos", "x_neg", "weight", "bias", "state1_weight", "state2_weight", "state1_bias", "state2_bias",
                "peer_mean", "step", "options"),
    "ff_grad_labeled": ("x", "label_pos", "label_neg", "num_classes", "label_value", "weight", "bias", "peer_mean",
                        "options"),
    "ff_step_labeled": ("x", "label_pos", "label_neg", "num_classes", "label_value", "weight", "bias",
                        "state1_weight", "state2_weight", "state1_bias", "state2_bias", "peer_mean", "step",
                        "options"),
    # the convolutional ops (cpu and cuda): their samples and opcheck are in test_conv_cpu.py and test_conv_gpu.py (4-D
    # inputs, their own options string FFConfig.conv_op_options); sample_inputs has none of them
    "ff_conv_grad": ("x_pos", "x_neg", "target", "weight", "bias", "stride", "padding", "dilation", "groups",
                     "num_classes", "options"),
    "ff_conv_step": ("x_pos", "x_neg", "target", "weight", "bias", "state1_weight", "state2_weight", "state1_bias",
                     "state2_bias", "stride", "padding", "dilation", "groups", "num_classes", "step", "options"),
}

B, K, N = 7, 130, 19  # odd batch and width; K spans two of the Triton interpreter's 128-wide tiles
NUM_CLASSES = 5

# (name, FFConfig options, bias, step, loss given to ff_update): every norm, goodness, loss and optimizer path,
# non-default numbers, state slots used fully / partly / not at all, with and without bias, first and later steps
CONFIGS = [
    ("rms-sum-hinton-adam-peer", dict(norm="rms", goodness="sum", loss="hinton", norm_eps=0.1, optimizer="adam",
                                      peer_norm=0.3, peer_momentum=0.8), True, 3, None),
    ("l2-mean-symba-sgd-momentum-wd-nobias-peer", dict(norm="l2", goodness="mean", loss="symba", symba_alpha=2.5,
                                                       norm_eps=0.1, optimizer="sgd", lr=0.05, momentum=0.9,
                                                       weight_decay=0.01, peer_norm=1.5, peer_momentum=0.0),
     False, 3, 0.7),
    ("none-sum-symba-sgd", dict(norm="none", goodness="sum", loss="symba", optimizer="sgd", lr=0.05), True, 2, 0.7),
    ("rms-mean-hinton-adam-wd-nobias-step1", dict(norm="rms", goodness="mean", loss="hinton", threshold=0.5,
                                                  optimizer="adam", lr=1e-2, betas=(0.8, 0.99), eps=1e-6,
                                                  weight_decay=0.05), False, 1, None),
    ("l2-sum-hinton-sgd-momentum-wd-step1", dict(norm="l2", goodness="sum", loss="hinton", optimizer="sgd", lr=0.02,
                                                 momentum=0.5, weight_decay=0.1), True, 1, 0.7),
    ("rms-sum-scff-adam-peer", dict(norm="rms", goodness="sum", loss="scff", threshold=3.0, threshold_neg=4.5,
                                    scff_lambda=0.2, optimizer="adam", peer_norm=0.5, peer_momentum=0.9),
     True, 2, None),
]
STRIDED = "strided"  # the first configuration with non-contiguous x (and gradients, for ff_update; peer_mean where
# it is only read)
# the arguments each op writes in place (its schema's Tensor(a!) arguments): peer_mean by the steps only
MUTATED = {
    "ff_grad": (),
    "ff_update": ("weight", "bias", "state1_weight", "state2_weight", "state1_bias", "state2_bias"),
    "ff_step": ("weight", "bias", "state1_weight", "state2_weight", "state1_bias", "state2_bias", "peer_mean"),
    "ff_grad_labeled": (),
    "ff_step_labeled": ("weight", "bias", "state1_weight", "state2_weight", "state1_bias", "state2_bias", "peer_mean"),
    "ff_conv_grad": (),
    "ff_conv_step": ("weight", "bias", "state1_weight", "state2_weight", "state1_bias", "state2_bias"),
}


@dataclass
class Sample:
    name: str
    cfg: FFConfig
    values: dict  # argument name -> value

    def __getitem__(self, name):
        return self.values[name]

    @property
    def step(self) -> int:
        return self.values["step"]

    def args(self, op: str) -> list:
        """The positional arguments of ``op`` (``options`` is the configuration's FFConfig.op_options)."""
        return [self.cfg.op_options if name == "options" else self.values[name] for name in ARGS[op]]

    def states(self, param: str) -> tuple:
        """The optimizer state of ``param`` ("weight" or "bias") as the functional API takes it."""
        return tuple(t for t in (self.values[f"state1_{param}"], self.values[f"state2_{param}"]) if t is not None)

    def clone(self) -> "Sample":
        """A copy with the same strides (Tensor.clone makes a strided view that has gaps contiguous)."""
        def copy(v):
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).copy_(v)
        return Sample(self.name, self.cfg, {k: copy(v) if isinstance(v, torch.Tensor) else v
                                            for k, v in self.values.items()})

    def to(self, dtype: torch.dtype) -> "Sample":
        """A contiguous copy in ``dtype`` (float64 for the oracle); labels and the loss keep their dtype."""
        def cast(name, v):
            if not isinstance(v, torch.Tensor):
                return v
            if v.is_floating_point() and name != "loss":
                v = v.to(state_dtype(dtype) if name.startswith("state") else dtype)
            return v.clone(memory_format=torch.contiguous_format)
        return Sample(self.name, self.cfg, {k: cast(k, v) for k, v in self.values.items()})


def sample_ids(op: str) -> list:
    return [name for name, *_ in CONFIGS] + [STRIDED]


def sample_inputs(op: str, device="cpu", dtype=torch.float32) -> list:
    """The samples of ``op`` (one per entry of ``sample_ids(op)``) as ``dtype`` tensors on ``device``."""
    if op not in ARGS:
        raise KeyError(f"no samples for op {op!r}")
    out = []
    for i, (name, opts, bias, step, loss) in enumerate(CONFIGS + [(STRIDED, *CONFIGS[0][1:])]):
        out.append(_sample(op, name, opts, bias, step, loss, strided=name == STRIDED, seed=i, device=device,
                           dtype=dtype))
    return out


def _sample(op, name, opts, bias, step, loss, strided, seed, device, dtype) -> Sample:
    g = torch.Generator().manual_seed(seed)
    opts = {"threshold": FFConfig.default_threshold(opts["goodness"], N), **opts}
    cfg = FFConfig(**opts)

    def rand(*shape, scale=1.0, shift=0.0, positive=False, dt=dtype):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        t = t.abs() if positive else t
        return (scale * t + shift).to(device=device, dtype=dt)

    def non_contiguous(t):  # same values, other strides
        return t.t().contiguous().t() if t.dim() == 2 else t

    bound = K ** -0.5
    v = {"weight": rand(N, K, scale=bound), "bias": rand(N, scale=bound) if bias else None,
         "step": step}
    sd = state_dtype(dtype)
    for param in ("weight", "bias"):
        p, names = v[param], cfg.state_names
        slots = [None, None]
        if p is not None:
            for j, s in enumerate(names):  # non-zero state: the kernels must read it, not assume a fresh one
                slots[j] = rand(*p.shape, scale=1e-5 if s == "exp_avg_sq" else 1e-3, positive=s == "exp_avg_sq",
                                dt=sd)
        v[f"state1_{param}"], v[f"state2_{param}"] = slots
    v["peer_mean"] = rand(N, scale=0.5, positive=True, dt=sd) if cfg.peer_norm else None
    if strided and op in ("ff_grad", "ff_grad_labeled"):  # read only: any strides
        v["peer_mean"] = torch.stack([v["peer_mean"], -v["peer_mean"]], 1)[:, 0]
    if op in ("ff_grad", "ff_step"):
        v["x_pos"], v["x_neg"] = rand(B, K, shift=0.5), rand(B, K, scale=1.5)
        if strided:
            v["x_pos"] = torch.cat([v["x_pos"], v["x_neg"]], 1)[:, :K]
            v["x_neg"] = non_contiguous(v["x_neg"])
    if op == "ff_update":
        v["grad_weight"] = rand(N, K, scale=1e-2)
        v["grad_bias"] = rand(N, scale=1e-2) if bias else None
        v["loss"] = None if loss is None else torch.tensor(loss, device=device, dtype=dtype)
        if strided:
            v["grad_weight"] = non_contiguous(v["grad_weight"])
    if op.endswith("_labeled"):
        v["x"] = rand(B, K, shift=0.5)
        if strided:
            v["x"] = torch.cat([v["x"], v["x"]], 1)[:, ::2]
        v["label_pos"] = torch.randint(0, NUM_CLASSES, (B,), generator=g).to(device)
        v["label_neg"] = (v["label_pos"] + torch.randint(1, NUM_CLASSES, (B,), generator=g).to(device)) % NUM_CLASSES
        v["num_classes"], v["label_value"] = NUM_CLASSES, 0.5 if seed % 2 else 1.0
    return Sample(name, cfg, v)
