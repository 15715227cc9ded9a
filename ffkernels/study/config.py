"""The settings of a study that decide its numbers, and their fingerprint (what makes a folder resumable)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Optional

from ..config import GOODNESS, LOSSES, NORMS, FFConfig
from ..precision import check_precision

STUDY_FORMAT_VERSION = 2   # 2: probes, the Adam probe's settings and the hybrid masks' blur became settings
PAPER_HIDDEN = (2000, 2000, 2000, 2000)
PROBES = ("lbfgs", "paper")   # see probe.py: standardized L-BFGS; the paper's Adam-trained linear classifier
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

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
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
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def fingerprint(self) -> str:
        """A short hash of ``to_dict()``: equal exactly when every setting is equal."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: "StudyConfig") -> list:
        """["name: mine -> other", ...] for every setting that differs."""
        a, b = self.to_dict(), other.to_dict()
        a.setdefault("precision", "fp32")  # to_dict leaves out the default precision
        b.setdefault("precision", "fp32")
        return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b.get(k)]
