"""The options of an FF layer: one frozen dataclass, validated once, shared by every backend."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import cached_property, lru_cache
from typing import Optional

NORMS = ("rms", "l2", "none")
GOODNESS = ("sum", "mean")
# scff: hinton with a threshold of its own for the negatives and a penalty on the positives' goodness (SCFF, Chen et
# al. 2024; docs/design.md, "The math")
LOSSES = ("hinton", "symba", "competitive", "scff")
# What one goodness value sums over (docs/design.md, "Convolutional FF"): "sample" a whole row / image, "location" the
# channels at one pixel (conv only), "group" one class's channel group (the competitive loss, and only it).
GOODNESS_OVER = ("sample", "location", "group")
GOODNESS_POWERS = (1, 2)  # g sums h**p: p = 2 (Hinton's h squared) or 1 (the activity itself, DeeperForward)
OPTIMIZERS = ("adam", "sgd")
# The dtype of the GEMM operands (docs/design.md, "Mixed precision"): "param" = the parameters' own dtype (no autocast);
# "bfloat16"/"float16" = the operands cast once, fp32 accumulation, everything else in the parameters' dtype. Set per
# call from torch.autocast (``autocast_config``), not kept by the layer.
GEMM_DTYPES = ("param", "bfloat16", "float16")


def _choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"ffkernels: unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def _number(name: str, value, lo: float, lo_inclusive: bool = True, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"ffkernels: {name} must be a number, got {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v) and (v >= lo if lo_inclusive else v > lo) and v < hi
    if not ok:
        bound = f"{'>=' if lo_inclusive else '>'} {lo:g}" + (f" and < {hi:g}" if math.isfinite(hi) else "")
        raise ValueError(f"ffkernels: {name} must be a finite number {bound}, got {value!r}")
    return v


# The keys of FFConfig.op_options, in the order they are written; python_api/ff_api.cpp parses the same keys.
OP_OPTION_KEYS = ("norm", "norm_eps", "goodness", "threshold", "threshold_neg", "loss", "symba_alpha", "scff_lambda",
                  "optimizer", "lr", "beta1", "beta2", "eps", "momentum", "weight_decay", "peer_norm", "peer_momentum",
                  "gemm_dtype")
# The conv ops (and FFLinear's competitive step, which runs as a 1x1 convolution) take three keys more; the linear ops'
# string has none of them, so a linear op computes sample goodness of h**2 by construction (``op_options`` refuses others).
CONV_OPTION_KEYS = OP_OPTION_KEYS + ("goodness_over", "goodness_power", "temperature")
_CHOICE_KEYS = ("norm", "goodness", "loss", "optimizer", "gemm_dtype", "goodness_over")


@dataclass(frozen=True)
class FFConfig:
    """Everything that defines an FF layer's local loss and its optimizer (see docs/design.md)."""

    goodness: str = "sum"
    threshold: float = 1.0
    threshold_neg: Optional[float] = None  # scff's threshold of the negatives; None: equal to threshold
    loss: str = "hinton"
    symba_alpha: float = 4.0
    scff_lambda: float = 0.0     # scff's penalty on the positives' goodness, lambda |g+|
    norm: str = "rms"
    norm_eps: float = 1e-8
    optimizer: str = "adam"
    lr: float = 3e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0
    peer_norm: float = 0.0       # lambda of peer normalization; 0: off (docs/design.md, "Peer normalization")
    peer_momentum: float = 0.9   # mu of its running mean of the positive activations
    gemm_dtype: str = "param"    # GEMM operand dtype; "param" outside autocast (docs/design.md, "Mixed precision")
    goodness_over: str = "sample"  # what one goodness sums over: sample | location (conv) | group (competitive)
    goodness_power: int = 2        # g = s * sum h**p, p in {1, 2}
    temperature: float = 1.0       # competitive loss: cross-entropy of g / temperature over the class groups

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "goodness", _choice("goodness", self.goodness, GOODNESS))
        set_(self, "loss", _choice("loss", self.loss, LOSSES))
        set_(self, "norm", _choice("norm", self.norm, NORMS))
        set_(self, "optimizer", _choice("optimizer", self.optimizer, OPTIMIZERS))
        set_(self, "gemm_dtype", _choice("gemm_dtype", self.gemm_dtype, GEMM_DTYPES))
        set_(self, "goodness_over", _choice("goodness_over", self.goodness_over, GOODNESS_OVER))
        if (self.loss == "competitive") != (self.goodness_over == "group"):
            raise ValueError(f"ffkernels: loss='competitive' goes with goodness_over='group' (one goodness per class "
                             f"group) and only with it, got loss={self.loss!r}, goodness_over={self.goodness_over!r}")
        power = self.goodness_power
        if isinstance(power, float) and power.is_integer():
            power = int(power)
        if isinstance(power, bool) or power not in GOODNESS_POWERS:
            raise ValueError(f"ffkernels: goodness_power must be 1 or 2, got {self.goodness_power!r}")
        set_(self, "goodness_power", int(power))
        set_(self, "temperature", _number("temperature", self.temperature, 0.0, lo_inclusive=False))
        if not math.isfinite(float(self.threshold)):
            raise ValueError(f"ffkernels: threshold must be finite, got {self.threshold!r}")
        set_(self, "threshold", float(self.threshold))
        if self.threshold_neg is None:  # resolved here, so a built config holds explicit numbers
            set_(self, "threshold_neg", self.threshold)
        if not math.isfinite(float(self.threshold_neg)):
            raise ValueError(f"ffkernels: threshold_neg must be finite, got {self.threshold_neg!r}")
        set_(self, "threshold_neg", float(self.threshold_neg))
        set_(self, "symba_alpha", _number("symba_alpha", self.symba_alpha, 0.0, lo_inclusive=False))
        set_(self, "scff_lambda", _number("scff_lambda", self.scff_lambda, 0.0))
        set_(self, "norm_eps", _number("norm_eps", self.norm_eps, 0.0))
        set_(self, "lr", _number("lr", self.lr, 0.0))
        try:
            b1, b2 = tuple(self.betas)
        except (TypeError, ValueError):
            raise ValueError(f"ffkernels: betas must be a pair (beta1, beta2), got {self.betas!r}") from None
        set_(self, "betas", (_number("beta1", b1, 0.0, hi=1.0), _number("beta2", b2, 0.0, hi=1.0)))
        set_(self, "eps", _number("eps", self.eps, 0.0))
        set_(self, "momentum", _number("momentum", self.momentum, 0.0))
        set_(self, "weight_decay", _number("weight_decay", self.weight_decay, 0.0))
        set_(self, "peer_norm", _number("peer_norm", self.peer_norm, 0.0))
        set_(self, "peer_momentum", _number("peer_momentum", self.peer_momentum, 0.0, hi=1.0))

    @staticmethod
    def default_threshold(goodness: str, out_features: int) -> float:
        """threshold=None means: out_features for "sum" goodness, 1.0 for "mean"."""
        return float(out_features) if _choice("goodness", goodness, GOODNESS) == "sum" else 1.0

    def replace(self, **kw) -> "FFConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @property
    def is_linear(self) -> bool:
        """Whether the linear ops can run these options: sample goodness of h**2 with the hinton, symba or scff loss."""
        return self.goodness_over == "sample" and self.goodness_power == 2 and self.loss != "competitive"

    def _options(self, keys) -> str:
        values = {k: getattr(self, k) for k in keys if hasattr(self, k)}
        values["beta1"], values["beta2"] = self.betas
        return ";".join(f"{k}={values[k]!r}" if isinstance(values[k], float) else f"{k}={values[k]}" for k in keys)

    @cached_property
    def op_options(self) -> str:
        """The ``options`` argument of the linear ops: every option as ``key=value``, ``;``-separated.

        One string crosses the op boundary instead of a dozen positional scalars; floats are written with
        ``repr`` (shortest exact round trip), and every op parses all keys (python_api/ff_api.cpp, and
        ``from_op_options`` for the Triton ops), so a key added here and not there fails loudly. Options the linear
        ops do not have (``is_linear`` False) raise ValueError: they run on the conv ops (``conv_op_options``).
        """
        if not self.is_linear:
            raise ValueError(f"ffkernels: the linear FF ops compute sample goodness of h**2 with the hinton, symba or "
                             f"scff loss; loss={self.loss!r}, goodness_over={self.goodness_over!r}, "
                             f"goodness_power={self.goodness_power} need the conv ops (FFConv2d)")
        return self._options(OP_OPTION_KEYS)

    @cached_property
    def update_config(self) -> "FFConfig":
        """These options for the update alone (``ff_update``: the optimizer's fields are all it reads): ``self`` when the
        linear ops take it, else the same optimizer with the linear loss fields, so a conv or competitive layer's
        split update runs on the one update op."""
        return self if self.is_linear else self.replace(loss="hinton", goodness_over="sample", goodness_power=2)

    @cached_property
    def conv_op_options(self) -> str:
        """The ``options`` argument of the conv ops: ``op_options``' keys, then goodness_over, goodness_power and
        temperature (CONV_OPTION_KEYS)."""
        return self._options(CONV_OPTION_KEYS)

    @staticmethod
    @lru_cache(maxsize=64)
    def from_op_options(options: str, conv: bool = False) -> "FFConfig":
        """The FFConfig an ``options`` string describes: the linear ops' keys (``op_options``) or, with ``conv``, the
        conv ops' (``conv_op_options``), as the C++ binding parses them; ValueError naming a missing, unknown or bad
        key (so a linear op never silently takes a conv string, whose math it does not compute)."""
        source = "FFConfig.conv_op_options" if conv else "FFConfig.op_options"
        if not isinstance(options, str):
            raise TypeError(f"ffkernels: options must be a str ({source}), got {type(options).__name__}")
        keys = CONV_OPTION_KEYS if conv else OP_OPTION_KEYS
        values = {}
        for item in options.split(";"):
            key, sep, value = item.partition("=")
            if not sep or key not in keys:
                raise ValueError(f"ffkernels: unknown option {key!r} in options {options!r}; expected the keys "
                                 f"{', '.join(keys)} (see {source})")
            if key in values:
                raise ValueError(f"ffkernels: option {key!r} is given twice in options {options!r}")
            values[key] = value
        missing = [k for k in keys if k not in values]
        if missing:
            raise ValueError(f"ffkernels: options {options!r} lack {', '.join(missing)} (see {source})")
        for key in values:
            if key not in _CHOICE_KEYS:
                try:
                    values[key] = float(values[key])
                except ValueError:
                    raise ValueError(f"ffkernels: option {key} must be a number, got {values[key]!r}") from None
        betas = (values.pop("beta1"), values.pop("beta2"))
        if "goodness_power" in values:
            values["goodness_power"] = int(values["goodness_power"]) if values["goodness_power"] in (1.0, 2.0) \
                else values["goodness_power"]
        return FFConfig(betas=betas, **values)

    @property
    def state_names(self) -> tuple:
        """Names of the per-parameter optimizer state tensors this configuration keeps."""
        if self.optimizer == "adam":
            return ("exp_avg", "exp_avg_sq")
        return ("momentum_buffer",) if self.momentum != 0.0 else ()
