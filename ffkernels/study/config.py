"""The settings of a study that decide its numbers, and their fingerprint (what makes a folder resumable)."""
from __future__ import annotations

import hashlib
import math
import json
from dataclasses import asdict, dataclass, fields
from typing import Optional

from ..config import GOODNESS, LOSSES, NORMS, FFConfig
from ..precision import check_precision

STUDY_FORMAT_VERSION = 2   # 2: probes, the Adam probe's settings and the hybrid masks' blur became settings
PAPER_HIDDEN = (2000, 2000, 2000, 2000)
PROBES = ("lbfgs", "paper", "scff")   # probe.py: standardized L-BFGS; the paper's Adam classifier; SCFF's read-out
SCFF_DEFAULTS = dict(scff_thresholds=((4.0, 6.0), (1.0, 1.0)), scff_lambda=1e-3, scff_shift=2)
_FF = FFConfig()  # the FF-layer settings default to the layer's own defaults


@dataclass(frozen=True)
class StudyConfig:
    """Everything that changes a study's results. Device, threads, backend and data location are not part of
    it: they are recorded per row, and a folder may be resumed on another machine."""

    hidden: tuple = PAPER_HIDDEN
    epochs: int = 20
    batch_size: int = 100
    ff_lr: float = _FF.lr         # Adam, every FF layer
    bp_lr: float = 1e-3           # Adam over the whole BP network (reference.make_bp_optimizer's default)
    goodness: str = _FF.goodness
    threshold: Optional[float] = None   # None: FFLinear's default (the width for "sum", 1 for "mean")
    loss: str = _FF.loss
    norm: str = _FF.norm          # the normalization before every layer, FF and BP alike
    probes: tuple = ("lbfgs",)    # the first one fills "transfer"/"best_transfer"; every one fills row["probes"]
    probe_steps: int = 100
    probe_weight_decay: float = 1e-3
    paper_probe_epochs: int = 100        # the "paper" probe: Adam on the raw features, minibatches
    paper_probe_lr: float = 1e-3
    paper_probe_batch_size: int = 100
    hybrid_blur_steps: int = 6           # the "hybrid" pretext's masks: [1/4, 1/2, 1/4] blurs before the 0.5 cut
    knn_k: int = 10
    tsne_points: int = 1000       # 0: no t-SNE maps
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    eval_every: int = 1           # pretext test accuracy every N epochs (training curves)
    version: int = STUDY_FORMAT_VERSION
    precision: str = "fp32"       # bf16: training under torch.autocast (precision.py); not in to_dict when fp32
    # the scff pretext's layers (pretext.py; algos.SCFFTrainer): (theta+, theta-) per layer, the last pair repeated
    # for deeper layers, the penalty lambda on the positive goodness, the views' largest shift in pixels. Not in
    # to_dict at these defaults, so the fingerprints of the studies before scff do not change.
    scff_thresholds: tuple = SCFF_DEFAULTS["scff_thresholds"]
    scff_lambda: float = SCFF_DEFAULTS["scff_lambda"]
    scff_shift: int = SCFF_DEFAULTS["scff_shift"]

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        try:
            pairs = tuple((float(a), float(b)) for a, b in self.scff_thresholds)
        except (TypeError, ValueError):
            raise ValueError(f"ffkernels: study scff_thresholds must be (theta+, theta-) pairs, got "
                             f"{self.scff_thresholds!r}") from None
        if not pairs or not all(math.isfinite(v) for pair in pairs for v in pair):
            raise ValueError(f"ffkernels: study scff_thresholds must be finite (theta+, theta-) pairs, got {pairs!r}")
        object.__setattr__(self, "scff_thresholds", pairs)
        if not (math.isfinite(self.scff_lambda) and self.scff_lambda >= 0) or self.scff_shift < 0:
            raise ValueError(f"ffkernels: study scff_lambda must be finite and >= 0 and scff_shift >= 0, got "
                             f"{self.scff_lambda}, {self.scff_shift}")
        check_precision(self.precision)
        probes = (self.probes,) if isinstance(self.probes, str) else tuple(self.probes)
        object.__setattr__(self, "probes", probes)
        if not probes or len(set(probes)) != len(probes) or any(p not in PROBES for p in probes):
            raise ValueError(f"ffkernels: study probes must be distinct names among {', '.join(map(repr, PROBES))}, "
                             f"got {list(probes)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "probe_steps": self.probe_steps,
                    "knn_k": self.knn_k, "eval_every": self.eval_every, "paper_probe_epochs": self.paper_probe_epochs,
                    "paper_probe_batch_size": self.paper_probe_batch_size, "hybrid_blur_steps": self.hybrid_blur_steps}
        positive.update({f"hidden[{i}]": h for i, h in enumerate(self.hidden)})
        for name, v in positive.items():
            if v < 1:
                raise ValueError(f"ffkernels: study {name} must be >= 1, got {v}")
        if not self.hidden:
            raise ValueError("ffkernels: study hidden needs at least one layer width")
        for name in ("ff_lr", "bp_lr", "paper_probe_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ffkernels: study {name} must be > 0, got {getattr(self, name)}")
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"ffkernels: study {name} must be None or >= 1, got {getattr(self, name)}")
        if self.probe_weight_decay < 0 or self.tsne_points < 0:
            raise ValueError("ffkernels: study probe_weight_decay and tsne_points must be >= 0")
        for name, choices in (("goodness", GOODNESS), ("loss", LOSSES), ("norm", NORMS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"ffkernels: unknown study {name} {getattr(self, name)!r}; expected one of "
                                 f"{', '.join(map(repr, choices))}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["probes"] = list(self.probes)
        if d["precision"] == "fp32":  # the fingerprints of the studies before --precision stay as they were
            del d["precision"]
        d["scff_thresholds"] = [list(p) for p in self.scff_thresholds]
        for k, v in SCFF_DEFAULTS.items():  # likewise before scff
            if getattr(self, k) == (tuple(map(tuple, v)) if k == "scff_thresholds" else v):
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "scff_thresholds" in kw:
            kw["scff_thresholds"] = tuple(tuple(p) for p in kw["scff_thresholds"])
        return cls(**kw)

    def fingerprint(self) -> str:
        """A short hash of ``to_dict()``: equal exactly when every setting is equal."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: "StudyConfig") -> list:
        """["name: mine -> other", ...] for every setting that differs."""
        a, b = self.to_dict(), other.to_dict()
        for d in (a, b):  # to_dict leaves out the defaults of settings added later
            d.setdefault("precision", "fp32")
            for k, v in SCFF_DEFAULTS.items():
                d.setdefault(k, [list(p) for p in v] if k == "scff_thresholds" else v)
        return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b.get(k)]
