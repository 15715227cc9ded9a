"""FFNet: a stack of FF layers (FFLinear, FFConv2d, with fixed modules such as pooling between them) trained greedily
in one sweep, with one host sync per step (docs/design.md, "Public API", "Host syncs", "FF CNNs")."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from ._types import NonFiniteLossError
from .backends import reference as ref
from .head import SoftmaxHead, rms_features
from .labels import embed_label_unchecked, embed_neutral, hard_negatives, wrong_labels
from .layer_base import FFLayerBase, nan_first_row_if, non_finite_error
from .linear import FFLinear, raise_label_range


class FFNetStepOutput(NamedTuple):
    losses: torch.Tensor                      # (num_layers,) the loss of each layer
    outputs: Optional[list]                   # per-layer FFStepOutput when return_outputs=True
    head_loss: Optional[torch.Tensor] = None  # the head's cross-entropy (ff_step_labeled on a net with a head)
    labels_neg: Optional[torch.Tensor] = None  # the negatives' labels (ff_step_labeled): given or drawn


PREDICT_METHODS = ("head", "goodness")
NEGATIVES = ("random", "hard")


class FFNet(nn.Module):
    """A stack of FF layers trained greedily: layer l+1 learns from layer l's activations.

    ``dims`` = [in_features, width_1, ..., width_L]; keyword options go to every FFLinear. Or ``modules=[...]``: FF
    layers (FFLinear, FFConv2d) in order, with parameter-free modules between them (nn.MaxPool2d, nn.AvgPool2d,
    nn.Flatten, nn.Dropout, ...): each runs on the previous FF layer's output before the next layer sees it (the
    goodness is taken before them). A net whose layers all have loss="competitive" trains with
    ``ff_step_competitive(x, target)`` and predicts by the class groups' goodness in one pass.
    ``predict_layers``: the layers whose goodness is summed for prediction by goodness (default: all but the
    first when there are several, as in Hinton 2022).

    ``head=True`` (needs ``num_classes``) adds a SoftmaxHead: a bias-free linear classifier on the
    RMS-normalized activities of ``head_layers`` (default: as ``predict_layers``) for the input with the neutral
    label, trained with cross-entropy in ``ff_step_labeled`` by its own optimizer (``head_optimizer``,
    ``head_lr``, ``head_weight_decay``, ``head_momentum`` for SGD). Its gradient never enters the FF layers.
    ``predict`` then uses it (one pass instead of one per label).
    """

    def __init__(self, dims: Optional[Sequence[int]] = None, bias: bool = True, *, modules=None, predict_layers=None,
                 head: bool = False, num_classes: Optional[int] = None, head_layers=None, head_optimizer: str = "adam",
                 head_lr: float = 1e-3, head_weight_decay: float = 0.0, head_momentum: float = 0.9,
                 **layer_kwargs):
        super().__init__()
        if (dims is None) == (modules is None):
            raise ValueError("ffkernels: FFNet takes dims (an MLP of FFLinear layers) or modules (FF layers and "
                             "parameter-free modules between them), not both")
        if modules is None:
            dims = list(dims)
            if len(dims) < 2:
                raise ValueError(f"ffkernels: dims needs an input size and at least one layer width, got {dims}")
            self.dims = dims
            self.layers = nn.ModuleList(FFLinear(a, b, bias, **layer_kwargs) for a, b in zip(dims[:-1], dims[1:]))
            self.between = nn.ModuleList(nn.Sequential() for _ in self.layers)
        else:
            if layer_kwargs:
                raise ValueError(f"ffkernels: with modules=, give the layer options to each layer, not to FFNet "
                                 f"({', '.join(sorted(layer_kwargs))})")
            self.dims = None
            self._set_modules(list(modules))
        self.competitive = all(layer.config.loss == "competitive" for layer in self.layers)
        if self.competitive:
            classes = {layer.num_classes for layer in self.layers}
            if len(classes) != 1:
                raise ValueError(f"ffkernels: every competitive layer of a net needs the same num_classes, got "
                                 f"{sorted(classes)}")
            if predict_layers is None:
                predict_layers = range(len(self.layers))
        elif any(layer.config.loss == "competitive" for layer in self.layers):
            raise ValueError("ffkernels: a net trains every layer with loss='competitive' or none of them")
        self.predict_layers = self._layer_list(predict_layers, "predict_layers")
        self.head = None
        self.head_layers = None
        if head:
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
                raise ValueError(f"ffkernels: a net with a head needs num_classes (an int >= 2), got {num_classes!r}")
            if dims is None:
                raise ValueError("ffkernels: the softmax head is for nets built from dims (FFLinear layers with the "
                                 "label in the input); a competitive net predicts by its class groups' goodness")
            if num_classes > dims[0]:
                raise ValueError(f"ffkernels: num_classes={num_classes} label slots do not fit {dims[0]} input features")
            self.head_layers = self._layer_list(head_layers, "head_layers")
            w = self.layers[0].weight
            self.head = SoftmaxHead(sum(dims[i + 1] for i in self.head_layers), num_classes,
                                    optimizer=head_optimizer, lr=head_lr, weight_decay=head_weight_decay,
                                    momentum=head_momentum, backend=layer_kwargs.get("backend", "auto"),
                                    device=w.device, dtype=w.dtype)
        elif head_layers is not None:
            raise ValueError("ffkernels: head_layers needs head=True")

    def _set_modules(self, modules) -> None:
        layers, between, pending = [], [], []
        for m in modules:
            if isinstance(m, FFLayerBase):
                if layers:
                    between.append(nn.Sequential(*pending))
                elif pending:
                    raise ValueError("ffkernels: the first module of an FFNet must be an FF layer (FFLinear, FFConv2d)")
                layers.append(m)
                pending = []
            elif not isinstance(m, nn.Module):
                raise TypeError(f"ffkernels: FFNet modules must be nn.Modules, got {type(m).__name__}")
            elif any(True for _ in m.parameters()):
                raise ValueError(f"ffkernels: {type(m).__name__} has parameters, which the FF sweep would not train; "
                                 "between FF layers only parameter-free modules (pooling, flatten, dropout) may stand")
            else:
                pending.append(m)
        if not layers:
            raise ValueError("ffkernels: FFNet needs at least one FF layer (FFLinear, FFConv2d)")
        between.append(nn.Sequential(*pending))
        self.layers, self.between = nn.ModuleList(layers), nn.ModuleList(between)

    def _layer_list(self, layers, what: str) -> list:
        n = len(self.layers)
        if layers is None:
            layers = list(range(1, n)) if n > 1 else [0]
        layers = [int(i) for i in layers]
        if not layers or any(not -n <= i < n for i in layers):
            raise ValueError(f"ffkernels: {what} must name layers in [0, {n}), got {layers}")
        return sorted({i % n for i in layers}) if what == "head_layers" else [i % n for i in layers]

    @property
    def num_classes(self) -> Optional[int]:
        """The head's number of classes (None without a head)."""
        return self.head.num_classes if self.head is not None else None

    # ---- training ------------------------------------------------------------------------------------

    def ff_step(self, x_pos: torch.Tensor, x_neg: torch.Tensor, return_outputs: bool = False) -> FFNetStepOutput:
        """Train every layer in one sweep on (x_pos, x_neg). The head (if any) is not trained: it needs labels.

        If layer l's loss is not finite, NonFiniteLossError is raised naming it: layers before l have taken
        their (finite) step, layer l and those after it are unchanged.
        """
        self._check_not_competitive("ff_step")
        return self._sweep(lambda layer: layer._step(x_pos, x_neg), return_outputs)

    def ff_step_competitive(self, x: torch.Tensor, target: torch.Tensor, return_outputs: bool = False
                            ) -> FFNetStepOutput:
        """Train every layer (all with loss="competitive") in one sweep on images or rows ``x`` with class labels
        ``target``: layer l steps on the previous layer's output after the modules between them. No negatives.
        If layer l's loss is not finite, NonFiniteLossError names it: layers before l stepped, the rest unchanged."""
        if not self.competitive:
            raise ValueError("ffkernels: ff_step_competitive needs every layer built with loss='competitive'")
        checks = []

        def first(layer):
            out, labels_bad = layer._step_competitive(x, target)
            checks.append(labels_bad.reshape(1))
            return out

        y = torch.as_tensor(target)
        safe = y.clamp(0, self.layers[0].num_classes - 1) if not (y.is_floating_point() or y.dtype == torch.bool) else y
        return self._sweep(first, return_outputs, checks,
                           lambda: raise_label_range(x, target, target, self.layers[0].num_classes),
                           next_step=lambda layer, x_pos, x_neg: layer._step_competitive(x_pos, safe)[0])

    def _check_not_competitive(self, what: str) -> None:
        if self.competitive:
            raise ValueError(f"ffkernels: {what} trains with positives and negatives; this net's layers use the "
                             "competitive loss: use ff_step_competitive(x, target)")
    def ff_step_labeled(self, x: torch.Tensor, labels_pos: torch.Tensor, labels_neg: Optional[torch.Tensor],
                        num_classes: int, value: float = 1.0, return_outputs: bool = False, *,
                        negatives: str = "random", generator: Optional[torch.Generator] = None,
                        temperature: float = 1.0, first_layer: str = "shared") -> FFNetStepOutput:
        """``ff_step`` on x with labels_pos (positives) / labels_neg (negatives) written into it.

        The first layer uses FFLinear.ff_step_labeled (shared GEMMs for pos and neg where the backend can);
        ``first_layer="pair"`` makes it step on the explicit pair (embed_label) instead: same math, other rounding.
        ``labels_neg=None`` draws them from ``generator``: ``negatives="random"`` uniformly among the wrong
        labels (``wrong_labels``), ``"hard"`` from the model's own scores (``hard_negatives`` with
        ``temperature``): the head's logits when the net has one (this step's, nothing recomputed), else the
        goodness of every label (``goodness_scores``: an extra forward of layers 2..L per label).

        With a head: first the neutral-label input goes through every layer with the weights before this step
        (one B-row forward per layer), giving the head's features and logits; then the FF sweep; then the head's
        cross-entropy step on those features. ``head_loss`` is its loss before its update; a non-finite one
        raises NonFiniteLossError after the FF layers have stepped, with the head unchanged.
        """
        self._check_not_competitive("ff_step_labeled")
        if not isinstance(self.layers[0], FFLinear):
            raise ValueError("ffkernels: ff_step_labeled writes the label into the input's first features; it needs a "
                             "first FFLinear layer")
        if negatives not in NEGATIVES:
            raise ValueError(f"ffkernels: unknown negatives {negatives!r}; expected one of "
                             f"{', '.join(map(repr, NEGATIVES))}")
        if labels_neg is not None and negatives != "random":
            raise ValueError("ffkernels: negatives='hard' draws labels_neg itself; pass labels_neg=None")
        if first_layer not in ("shared", "pair"):
            raise ValueError(f"ffkernels: first_layer must be 'shared' or 'pair', got {first_layer!r}")
        feats = logits = None
        if self.head is not None:
            self._check_head_classes(num_classes)
            with torch.no_grad():
                feats = self.head_features(x, value).reshape(-1, self.head.in_features)
                logits = self.head(feats)
        # labels clamped into [0, C) where they index a tensor (hard negatives, the head's gather): out-of-range
        # labels must not fault on the device before the one host check at the end, which then raises for them
        y_pos = torch.as_tensor(labels_pos, device=self.layers[0].weight.device)
        y_safe = y_pos.long().clamp(0, num_classes - 1)
        if labels_neg is None:
            if negatives == "random":
                labels_neg = wrong_labels(torch.as_tensor(labels_pos), num_classes, generator)
            else:
                scores = logits if logits is not None else self.goodness_scores(x, num_classes, value=value)
                labels_neg = hard_negatives(scores.reshape(-1, num_classes), y_safe.to(scores.device).reshape(-1),
                                            generator, temperature).reshape(y_pos.shape)

        def first(layer):
            out, labels_bad = layer._step_labeled(x, labels_pos, labels_neg, num_classes, value,
                                                  pair=first_layer == "pair")
            if labels_bad is not None:
                checks.append(labels_bad.reshape(1))
            return out

        checks = []
        out = self._sweep(first, return_outputs, checks,
                          lambda: raise_label_range(x, labels_pos, labels_neg, num_classes),
                          None if self.head is None else (feats, y_safe.to(feats.device).reshape(-1), logits))
        return out._replace(labels_neg=labels_neg)

    def _sweep(self, first_step, return_outputs: bool, checks=None, raise_labels=None, head=None,
               next_step=None) -> FFNetStepOutput:
        """Every layer's step, then one host sync for all of them (docs/design.md, "Host syncs").

        Each layer's update is skipped on the device when its loss is not finite; a non-finite loss also turns the
        first row of the next layer's input to NaN (``nan_first_row_if``), so every later layer's loss is NaN and
        its update skipped too. After the sweep one read of all the losses (and ``checks``: 1-element bool tensors,
        True = bad, e.g. the labels' range) decides: all fine, every step_count advances; else the step counts of
        the layers that stepped (finite loss) advance and the error names the first failure.
        """
        checks = [] if checks is None else checks
        next_step = next_step or (lambda layer, x_pos, x_neg: layer._step(x_pos, x_neg))
        losses, outputs = [], []
        x_pos = x_neg = None
        try:
            for i, layer in enumerate(self.layers):
                out = first_step(layer) if i == 0 else next_step(layer, x_pos, x_neg)
                losses.append(out.loss)
                if return_outputs:
                    outputs.append(out)
                x_pos = self.between[i](out.h_pos)
                x_neg = None if out.h_neg is None else self.between[i](out.h_neg)
                if i + 1 < len(self.layers):
                    x_pos = nan_first_row_if(~torch.isfinite(out.loss), x_pos)
        except BaseException:
            self._account_steps(losses)  # the layers that ran did step where their loss was finite
            raise
        stacked = torch.stack(losses)
        ff_bad = ~torch.isfinite(stacked)
        flags = torch.cat(checks + [ff_bad]) if checks else ff_bad
        head_loss = None
        if head is not None:  # (features, labels, logits): its update only if every FF check passed, on the device
            head_loss = self.head._step(*head, gate=~flags.any())  # fp32 (fp64 for fp64 heads)
            flags = torch.cat([flags, ~torch.isfinite(head_loss).reshape(1)])
        if bool(flags.any()):  # the one host sync of the step
            self._raise_after_sweep(losses, flags[:len(checks)], raise_labels, head_loss)
        for layer in self.layers:
            layer.step_count += 1
        if head is not None:
            self.head.step_count += 1
        return FFNetStepOutput(stacked, outputs if return_outputs else None,
                               None if head_loss is None else head_loss.to(self.head.weight.dtype))

    def _account_steps(self, losses) -> None:
        """Advance the step count of each layer that ran whose loss is finite (its update happened)."""
        if losses:
            for layer, ok in zip(self.layers, torch.isfinite(torch.stack(losses)).tolist()):
                layer.step_count += int(ok)

    def _raise_after_sweep(self, losses, check_flags, raise_labels, head_loss) -> None:
        """The failure path of ``_sweep`` (host reads are free here): advance what stepped, raise the first error."""
        self._account_steps(losses)
        if bool(check_flags.any()):
            raise_labels()
            raise ValueError("ffkernels: a check of the step's inputs failed")  # not reached: raise_labels raises
        for i, loss in enumerate(losses):
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLossError(f"ffkernels: layer {i}: {non_finite_error(loss)} "
                                         f"(layers 0..{i - 1} were updated)")
        self.head._raise_non_finite(head_loss)

    # ---- inference -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, between in zip(self.layers, self.between):
            x = between(layer(x))
        return x

    def features(self, x: torch.Tensor, upto: Optional[int] = None) -> list:
        """The activations of every layer (or of layers 0..upto) for input ``x`` (each before the modules after
        it)."""
        feats = []
        n = len(self.layers) if upto is None else upto + 1
        for i in range(n):
            h = self.layers[i].ff_forward(x)  # under autocast: bf16 GEMMs, fp32 activations, as the steps
            feats.append(h)
            if i + 1 < n:
                x = self.between[i](h)
        return feats

    def goodness(self, x: torch.Tensor) -> torch.Tensor:
        """(…, num_layers): the goodness of ``x`` at every layer (per-row goodness layers only)."""
        kind = [layer.config.goodness for layer in self.layers]
        return torch.stack([ref.goodness(h, k) for h, k in zip(self.features(x), kind)], dim=-1)

    def _check_head_classes(self, num_classes: int) -> None:
        if self.head is None:
            raise ValueError("ffkernels: this FFNet has no head (construct it with head=True, num_classes=...)")
        if num_classes != self.head.num_classes:
            raise ValueError(f"ffkernels: the head was built for num_classes={self.head.num_classes}, got "
                             f"num_classes={num_classes}")

    def head_features(self, x: torch.Tensor, value: float = 1.0) -> torch.Tensor:
        """(…, head.in_features): the head's input for ``x``: x with the neutral label (every label slot
        value/num_classes), through the layers, each head layer's activity RMS-normalized, concatenated."""
        self._check_head_classes(self.head.num_classes)
        hs = self.features(embed_neutral(x, self.head.num_classes, value), upto=self.head_layers[-1])
        return rms_features([hs[i] for i in self.head_layers])

    def head_logits(self, x: torch.Tensor, value: float = 1.0) -> torch.Tensor:
        """(…, num_classes): the head's logits for ``x`` (one pass with the neutral label)."""
        return self.head(self.head_features(x, value))

    @torch.no_grad()
    def goodness_scores(self, x: torch.Tensor, num_classes: int, layers=None, value: float = 1.0) -> torch.Tensor:
        """(…, num_classes): for each label c, the goodness summed over ``layers`` (default ``predict_layers``)
        of ``embed_label(x, c)``.

        The first layer is shared across labels: every one-hot label of the same value gives the same row norm
        d, so z_c = (P + value·W[:, c]) / d + b with P = x̃ Wᵀ, x̃ = x with the label slots zeroed, computed
        once (z_c = P/d + b + value·W[:, c]/d, the same up to rounding); then layers 2..max(layers) run on the C·n
        rows.
        """
        layers = self.predict_layers if layers is None else [int(i) % len(self.layers) for i in layers]
        if self.competitive:
            return self._group_scores(x, num_classes, layers)
        first = self.layers[0]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[-1] != first.in_features:
            raise ValueError(f"ffkernels: x has {x2.shape[-1]} features but the net takes {first.in_features}")
        if not isinstance(num_classes, int) or not 2 <= num_classes <= first.in_features:
            raise ValueError(f"ffkernels: num_classes must be an int in [2, {first.in_features}], got {num_classes!r}")
        cfg, w, n, c = first.config, first.weight, x2.shape[0], num_classes
        img = x2[:, c:]
        base = img @ w[:, c:].t()                                                  # (n, N), the one GEMM
        label = (value * w[:, :c].t()).unsqueeze(1)                                # (C, 1, N)
        if cfg.norm != "none":  # every one-hot label of this value gives the row the same norm: label 0's serves
            d = ref.row_divisor(embed_label_unchecked(x2, torch.zeros(n, dtype=torch.long, device=x2.device), c,
                                                      value),
                                cfg.norm, cfg.norm_eps)
            base = base / d
            z = label / d                                                          # (C, n, N)
        else:
            z = label.expand(c, n, -1).clone()
        if first.bias is not None:
            base = base + first.bias
        h = z.add_(base).relu_().reshape(c * n, -1)   # three passes over the C·n rows
        score = torch.zeros(c * n, dtype=h.dtype, device=h.device)
        for i in range(max(layers) + 1):
            if i > 0:
                h = self.layers[i].ff_forward(h)
            if i in layers:
                score += ref.goodness(h, self.layers[i].config.goodness) * layers.count(i)
        return score.view(c, n).t().reshape(*x.shape[:-1], c)

    def _group_scores(self, x: torch.Tensor, num_classes: int, layers) -> torch.Tensor:
        """(B, C): the class groups' goodness summed over ``layers``, one pass (a competitive net)."""
        if num_classes != self.layers[0].num_classes:
            raise ValueError(f"ffkernels: the net's class groups are for num_classes={self.layers[0].num_classes}, "
                             f"got num_classes={num_classes}")
        score = 0
        for i, h in enumerate(self.features(x, upto=max(layers))):
            if i in layers:
                score = score + self.layers[i].goodness_of(h) * layers.count(i)
        return score

    @torch.no_grad()
    def predict(self, x: torch.Tensor, num_classes: int, layers=None, value: float = 1.0,
                batch_size: int = 1024, method: Optional[str] = None) -> torch.Tensor:
        """The predicted label of each row of ``x``.

        ``method="goodness"``: the label whose one-hot, written into ``x``, gives the highest goodness over
        ``layers`` (``goodness_scores``). ``"head"``: the arg-max of the head's logits for the neutral-label
        input (one pass). Default: ``"head"`` when the net has a head, else ``"goodness"``.
        """
        method = method or ("head" if self.head is not None else "goodness")
        if method not in PREDICT_METHODS:
            raise ValueError(f"ffkernels: unknown predict method {method!r}; expected one of "
                             f"{', '.join(map(repr, PREDICT_METHODS))}")
        if method == "head":
            self._check_head_classes(num_classes)
            if layers is not None:
                raise ValueError("ffkernels: layers applies to method='goodness'; the head reads head_layers")
        preds = []
        rows = x.reshape(-1, x.shape[-1]) if isinstance(self.layers[0], FFLinear) else x
        for chunk in rows.split(batch_size):
            score = (self.head_logits(chunk, value) if method == "head"
                     else self.goodness_scores(chunk, num_classes, layers, value))
            preds.append(score.argmax(-1))
        return torch.cat(preds).reshape(rows.shape[:1] if rows is x else x.shape[:-1])

    @property
    def backend(self) -> str:
        return self.layers[0].backend
