"""FFLinear (a drop-in nn.Linear + ReLU that trains itself with Forward-Forward) and FFNet."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from ._types import FFGradOutput, FFStepOutput, NonFiniteLossError
from .backends import BACKEND_NAMES, get_backend, resolve_backend
from .backends import reference as ref
from .backends.contract import (autocast_config, autocast_gemm_dtype, check_ff_inputs, check_gemm_dtype,
                                 state_dtype)
from .config import FFConfig
from .head import SoftmaxHead, rms_features
from .labels import (check_label_range, embed_label_unchecked, embed_neutral, hard_negatives,
                     labels_out_of_range, wrong_labels)
from .step_state import extra_state, load_extra_state


def _non_finite_error(loss: torch.Tensor) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"ffkernels: the FF loss is not finite ({loss.item()}); the weights and optimizer state were "
        "left unchanged. Check the inputs for NaN/inf, or lower the learning rate.")


def _raise_label_range(x, labels_pos, labels_neg, num_classes: int) -> None:
    for labels in (labels_pos, labels_neg):
        check_label_range(torch.as_tensor(labels, device=x.device), num_classes)


def _nan_first_row_if(bad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` with its first row set to NaN where the 0-d bool ``bad`` is True (in place, no host sync).

    This is how a sweep carries "an earlier layer's step was not finite" to the next layer without reading it on
    the host: a NaN row makes that layer's loss NaN (every backend propagates NaN through the normalization, the
    GEMM and relu), so its update is skipped on the device like any non-finite step. Where ``bad`` is False the
    values are untouched, bit for bit.
    """
    x = x.contiguous()
    if x.numel():
        x.view(-1, x.shape[-1])[:1].masked_fill_(bad, float("nan"))
    return x


class FFLinear(nn.Module):
    """``relu(norm(x) @ W.T + b)`` that trains itself with the Forward-Forward algorithm.

    Same parameters, shapes and initialization as ``nn.Linear``; ``ff_step(x_pos, x_neg)`` runs one fused
    step (forward, goodness, local loss, exact local gradient and the optimizer update of W and b) without
    building an autograd graph. The optimizer state and step count live in the module's state_dict.

    ``peer_norm`` = lambda > 0 turns on peer normalization with momentum ``peer_momentum``: the running mean of
    each unit's positive activations is the buffer ``peer_mean`` (in the state_dict; zeros at first), and the
    loss gains lambda times its variance over the units (docs/design.md, "Peer normalization").
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, goodness: str = "sum",
                 threshold: Optional[float] = None, loss: str = "hinton", symba_alpha: float = 4.0,
                 norm: str = "rms", norm_eps: float = 1e-8, optimizer: str = "adam", lr: float = 3e-3,
                 betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0, weight_decay: float = 0.0,
                 peer_norm: float = 0.0, peer_momentum: float = 0.9, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for nm, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ffkernels: {nm} must be a positive int, got {v!r}")
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"ffkernels: unknown backend {backend!r}; expected 'auto' or one of "
                             f"{', '.join(map(repr, BACKEND_NAMES))}")
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        if threshold is None:
            threshold = FFConfig.default_threshold(goodness, out_features)
        self.config = FFConfig(goodness=goodness, threshold=threshold, loss=loss, symba_alpha=symba_alpha,
                               norm=norm, norm_eps=norm_eps, optimizer=optimizer, lr=lr, betas=betas,
                               eps=eps, momentum=momentum, weight_decay=weight_decay, peer_norm=peer_norm,
                               peer_momentum=peer_momentum)
        self.backend_request = backend
        self.step_count = 0
        self._make_state()
        self.reset_parameters()

    # ---- construction ------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """nn.Linear's initialization; also resets the optimizer state."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_optimizer_state()

    def _params(self):
        return [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None else [])

    def _state_buffer_names(self):
        return [f"{s}_{p}" for s in self.config.state_names for p, _ in self._params()]

    def _make_state(self) -> None:
        keep = self._state_buffer_names() + ["peer_mean"]
        for name in [n for n in list(self._buffers) if n not in keep]:
            del self._buffers[name]
        for s in self.config.state_names:
            for pname, p in self._params():
                self.register_buffer(f"{s}_{pname}", torch.zeros_like(p, dtype=state_dtype(p.dtype)))
        self._make_peer_mean()

    def _make_peer_mean(self) -> None:
        """The buffer peer_mean (r, zeros at first) exactly when peer normalization is on."""
        if self.config.peer_norm != 0.0 and "peer_mean" not in self._buffers:
            w = self.weight
            self.register_buffer("peer_mean", torch.zeros(self.out_features, dtype=state_dtype(w.dtype),
                                                          device=w.device))
        elif self.config.peer_norm == 0.0 and "peer_mean" in self._buffers:
            del self._buffers["peer_mean"]

    def _peer_mean(self):
        """The running mean r of peer normalization, or None when it is off."""
        return self._buffers["peer_mean"] if self.config.peer_norm != 0.0 else None

    def _own_buffer_names(self):
        """The optimizer state buffers and, with peer normalization, peer_mean: kept fp32 (fp64 for fp64)."""
        return self._state_buffer_names() + (["peer_mean"] if "peer_mean" in self._buffers else [])

    def reset_optimizer_state(self) -> None:
        """Zero the optimizer state, the peer-norm running mean and the step count (a fresh optimizer)."""
        for name in self._own_buffer_names():
            getattr(self, name).zero_()
        self.step_count = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "FFLinear":
        """An FFLinear with the weights (copied), shape, device and dtype of ``linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"ffkernels: from_linear takes an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def configure(self, **options) -> "FFLinear":
        """Change options (e.g. ``lr`` for a schedule). Changing the optimizer kind resets its state.

        Turning peer normalization on (peer_norm > 0) adds the buffer peer_mean at zero; turning it off removes it.
        """
        old_names = self.config.state_names
        self.config = self.config.replace(**options)
        if self.config.state_names != old_names:
            self._make_state()
            self.step_count = 0
        self._make_peer_mean()
        return self

    # ---- backend -----------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend that runs this layer's steps for its current device and dtype."""
        return resolve_backend(self.backend_request, self.weight.device, self.weight.dtype)

    def _step_config(self, backend):
        """The layer's options for this call: with the GEMM dtype of the current torch.autocast (docs/design.md,
        "Mixed precision"); a backend without that GEMM dtype raises here, before anything runs."""
        cfg = autocast_config(self.config, self.weight)
        check_gemm_dtype(backend, cfg)
        return cfg

    def _states(self, pname: str):
        return tuple(getattr(self, f"{s}_{pname}") for s in self.config.state_names)

    # ---- FF training -------------------------------------------------------------------------------

    def _flatten_inputs(self, x_pos, x_neg):
        for nm, x in (("x_pos", x_pos), ("x_neg", x_neg)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"ffkernels: {nm} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() < 1:
                raise ValueError(f"ffkernels: {nm} must have shape (..., {self.in_features}), got a scalar")
        if x_pos.shape[:-1] != x_neg.shape[:-1]:
            raise ValueError(f"ffkernels: x_pos and x_neg must have the same batch shape, got "
                             f"{tuple(x_pos.shape)} and {tuple(x_neg.shape)}")
        lead = x_pos.shape[:-1]
        xp = x_pos.detach().reshape(-1, x_pos.shape[-1]).contiguous()
        xn = x_neg.detach().reshape(-1, x_neg.shape[-1]).contiguous()
        check_ff_inputs(xp, xn, self.weight, self.bias)
        return xp, xn, lead

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss)):
            raise _non_finite_error(loss)

    def _param_views(self):
        return self.weight.detach(), (self.bias.detach() if self.bias is not None else None)

    def ff_step(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> FFStepOutput:
        """One FF training step on positives ``x_pos`` and negatives ``x_neg`` of shape (..., in_features).

        Returns loss, h_pos, h_neg, g_pos, g_neg (computed with the weights before the update) and updates
        the layer in place. Raises NonFiniteLossError, changing nothing, if the loss is not finite.
        One host sync (reading whether the loss is finite).
        """
        out = self._step(x_pos, x_neg)
        self._check_finite(out.loss)
        self.step_count += 1
        return out

    def _step(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> FFStepOutput:
        """``ff_step`` without the host check: the backend skips the update on the device when the loss is not
        finite; the caller reads the loss and advances ``step_count`` exactly when it is finite."""
        xp, xn, lead = self._flatten_inputs(x_pos, x_neg)
        w, b = self._param_views()
        backend = get_backend(self.backend)
        with torch.no_grad():
            out = backend.step(xp, xn, w, b, self._states("weight"), self._states("bias") if b is not None else (),
                               self.step_count + 1, self._step_config(backend), peer_mean=self._peer_mean())
        return FFStepOutput(out.loss, out.h_pos.reshape(*lead, -1), out.h_neg.reshape(*lead, -1),
                            out.g_pos.reshape(lead), out.g_neg.reshape(lead))

    def ff_step_labeled(self, x: torch.Tensor, labels_pos: torch.Tensor, labels_neg: torch.Tensor,
                        num_classes: int, value: float = 1.0) -> FFStepOutput:
        """``ff_step(embed_label(x, labels_pos), embed_label(x, labels_neg))`` for Hinton-style supervised FF.

        Positive and negative share every feature but the label slots, so backends that can (``cpu``) compute
        the shared part once: B-row GEMMs instead of 2B-row ones. Others build the pair and call ``ff_step``.
        One host sync (the loss and, where the pair is built here, the labels' range, read together).
        """
        out, labels_bad = self._step_labeled(x, labels_pos, labels_neg, num_classes, value)
        if labels_bad is None:
            self._check_finite(out.loss)
        else:
            bad_labels, bad_loss = torch.stack([labels_bad, ~torch.isfinite(out.loss)]).tolist()
            if bad_labels:
                _raise_label_range(x, labels_pos, labels_neg, num_classes)
            if bad_loss:
                raise _non_finite_error(out.loss)
        self.step_count += 1
        return out

    def _step_labeled(self, x, labels_pos, labels_neg, num_classes: int, value: float = 1.0, pair: bool = False):
        """(``ff_step_labeled`` without the host check, labels_bad): labels_bad is None when the backend's fused
        labeled step ran (its op checks the labels), else a 0-d bool tensor (labels outside [0, num_classes)) for
        the caller to read; the pair was then built without reading the labels and, with bad labels, made NaN so
        the update is skipped on the device. ``pair=True`` builds the pair whatever the backend."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ffkernels: x must be a torch.Tensor, got {type(x).__name__}")
        backend = get_backend(self.backend)
        fused = None if pair else getattr(backend, "step_labeled", None)
        if fused is None or x.dim() != 2:
            yp = torch.as_tensor(labels_pos, device=x.device)
            yn = torch.as_tensor(labels_neg, device=x.device)
            xp = embed_label_unchecked(x, yp, num_classes, value)
            xn = embed_label_unchecked(x, yn, num_classes, value)
            bad = labels_out_of_range(yp, num_classes) | labels_out_of_range(yn, num_classes)
            return self._step(_nan_first_row_if(bad, xp), xn), bad
        check_ff_inputs(x, x, self.weight, self.bias)
        w, b = self._param_views()
        with torch.no_grad():
            out = fused(x.detach(), torch.as_tensor(labels_pos), torch.as_tensor(labels_neg), num_classes,
                        float(value), w, b, self._states("weight"), self._states("bias") if b is not None else (),
                        self.step_count + 1, self._step_config(backend), peer_mean=self._peer_mean())
        return out, None

    def ff_grad(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> FFGradOutput:
        """The local FF gradient (and loss, h, g) without updating anything (see ``ff_update``).

        With peer normalization it reads the running mean peer_mean (the loss and gradient include L_peer) but
        does not update it.
        """
        xp, xn, lead = self._flatten_inputs(x_pos, x_neg)
        w, b = self._param_views()
        backend = get_backend(self.backend)
        with torch.no_grad():
            out = backend.grad(xp, xn, w, b, self._step_config(backend), peer_mean=self._peer_mean())
        return FFGradOutput(out.loss, out.h_pos.reshape(*lead, -1), out.h_neg.reshape(*lead, -1),
                            out.g_pos.reshape(lead), out.g_neg.reshape(lead), out.grad_weight, out.grad_bias)

    def ff_update(self, grad_weight: torch.Tensor, grad_bias: Optional[torch.Tensor] = None,
                  loss: Optional[torch.Tensor] = None) -> None:
        """Apply one optimizer update from given gradients (e.g. all-reduced across processes).

        With ``loss`` given and not finite, raises NonFiniteLossError and changes nothing. Not available with
        peer normalization (NotImplementedError): the running mean peer_mean must advance with the batch the
        gradient came from, which the gradient alone does not carry; use ``ff_step``.
        """
        if self.config.peer_norm != 0.0:
            raise NotImplementedError(
                "ffkernels: FFLinear.ff_update (the split ff_grad -> ff_update path, e.g. data-parallel training) "
                f"does not support peer normalization (peer_norm={self.config.peer_norm:g}): its running mean "
                "peer_mean must advance with the positive activations of the step's whole batch, which a gradient "
                "does not carry. Use ff_step / ff_step_labeled, or configure(peer_norm=0.0).")
        if grad_weight.shape != self.weight.shape:
            raise ValueError(f"ffkernels: grad_weight must have shape {tuple(self.weight.shape)}, "
                             f"got {tuple(grad_weight.shape)}")
        if (self.bias is None) != (grad_bias is None):
            raise ValueError("ffkernels: grad_bias must be given exactly when the layer has a bias")
        if loss is not None:
            self._check_finite(loss)
        w, b = self._param_views()
        with torch.no_grad():
            get_backend(self.backend).update(w, b, grad_weight, grad_bias, self._states("weight"),
                                             self._states("bias") if b is not None else (),
                                             self.step_count + 1, self.config)
        self.step_count += 1

    # ---- inference (differentiable, like nn.Linear + ReLU) -------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled(w.device.type):
            # torch.autocast caches its casts of leaf parameters for the whole autocast region, and the FF steps update
            # the weights in place inside it: cast views (not leaves) instead, so every call sees the current weights
            w, b = w.view_as(w), (None if b is None else b.view_as(b))
        return ref.layer_forward(x, w, b, self.config.norm, self.config.norm_eps)

    def ff_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(norm(x) @ W.T + b)`` as this layer's FF steps compute it: under torch.autocast (float32 weights) the
        GEMM in bf16 (x̂ and W cast, bf16 output) and the bias, ReLU and the output in fp32 (docs/design.md, "Mixed
        precision"); outside autocast exactly ``self(x)``. FFNet's own passes (features, the head's input, goodness
        scores, predict) use it: ``self(x)`` follows autocast like nn.Linear (bf16 out), which costs the head about a
        point of accuracy on mnist5k."""
        gemm = autocast_gemm_dtype(self.weight)
        if gemm == "param":
            return self(x)
        c = self.config
        with torch.autocast(self.weight.device.type, enabled=False):  # ref.linear makes the casts
            return ref.layer_forward(x.to(self.weight.dtype), self.weight, self.bias, c.norm, c.norm_eps, gemm)

    def goodness(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row goodness of ``x`` under the current weights."""
        return ref.goodness(self(x), self.config.goodness)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"goodness={c.goodness!r}, threshold={c.threshold:g}, loss={c.loss!r}, norm={c.norm!r}, "
                f"optimizer={c.optimizer!r}, lr={c.lr:g}, "
                + (f"peer_norm={c.peer_norm:g}, peer_momentum={c.peer_momentum:g}, " if c.peer_norm != 0.0 else "")
                + f"backend={self.backend_request!r}")

    # ---- state -------------------------------------------------------------------------------------

    def get_extra_state(self):
        return extra_state(self)

    def set_extra_state(self, state) -> None:
        load_extra_state(self, state, "layer")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = [prefix + n for n in self._own_buffer_names()] + [prefix + "_extra_state"]
        plain_linear = not any(k in state_dict for k in own)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if plain_linear:  # an nn.Linear state_dict: new weights, fresh optimizer
            missing_keys[:] = [k for k in missing_keys if k not in own]
            self.reset_optimizer_state()

    def _apply(self, fn, recurse=True):
        # keep the optimizer state and peer_mean fp32 (fp64 for fp64 params) whatever dtype the layer is cast to
        saved = {n: self._buffers.pop(n) for n in self._own_buffer_names()}
        super()._apply(fn, recurse)
        for n, buf in saved.items():
            p = self.weight
            self._buffers[n] = buf.to(device=p.device, dtype=state_dtype(p.dtype))
        return self


class FFNetStepOutput(NamedTuple):
    losses: torch.Tensor                      # (num_layers,) the loss of each layer
    outputs: Optional[list]                   # per-layer FFStepOutput when return_outputs=True
    head_loss: Optional[torch.Tensor] = None  # the head's cross-entropy (ff_step_labeled on a net with a head)
    labels_neg: Optional[torch.Tensor] = None  # the negatives' labels (ff_step_labeled): given or drawn


PREDICT_METHODS = ("head", "goodness")
NEGATIVES = ("random", "hard")


class FFNet(nn.Module):
    """A stack of FFLinear layers trained greedily: layer l+1 learns from layer l's activations.

    ``dims`` = [in_features, width_1, ..., width_L]; keyword options go to every FFLinear.
    ``predict_layers``: the layers whose goodness is summed for prediction by goodness (default: all but the
    first when there are several, as in Hinton 2022).

    ``head=True`` (needs ``num_classes``) adds a SoftmaxHead: a bias-free linear classifier on the
    RMS-normalized activities of ``head_layers`` (default: as ``predict_layers``) for the input with the neutral
    label, trained with cross-entropy in ``ff_step_labeled`` by its own optimizer (``head_optimizer``,
    ``head_lr``, ``head_weight_decay``, ``head_momentum`` for SGD). Its gradient never enters the FF layers.
    ``predict`` then uses it (one pass instead of one per label).
    """

    def __init__(self, dims: Sequence[int], bias: bool = True, *, predict_layers=None, head: bool = False,
                 num_classes: Optional[int] = None, head_layers=None, head_optimizer: str = "adam",
                 head_lr: float = 1e-3, head_weight_decay: float = 0.0, head_momentum: float = 0.9,
                 **layer_kwargs):
        super().__init__()
        dims = list(dims)
        if len(dims) < 2:
            raise ValueError(f"ffkernels: dims needs an input size and at least one layer width, got {dims}")
        self.dims = dims
        self.layers = nn.ModuleList(FFLinear(a, b, bias, **layer_kwargs) for a, b in zip(dims[:-1], dims[1:]))
        self.predict_layers = self._layer_list(predict_layers, "predict_layers")
        self.head = None
        self.head_layers = None
        if head:
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
                raise ValueError(f"ffkernels: a net with a head needs num_classes (an int >= 2), got {num_classes!r}")
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
        return self._sweep(lambda layer: layer._step(x_pos, x_neg), return_outputs)

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
                          lambda: _raise_label_range(x, labels_pos, labels_neg, num_classes),
                          None if self.head is None else (feats, y_safe.to(feats.device).reshape(-1), logits))
        return out._replace(labels_neg=labels_neg)

    def _sweep(self, first_step, return_outputs: bool, checks=None, raise_labels=None, head=None) -> FFNetStepOutput:
        """Every layer's step, then one host sync for all of them (docs/design.md, "Host syncs").

        Each layer's update is skipped on the device when its loss is not finite; a non-finite loss also turns the
        first row of the next layer's input to NaN (``_nan_first_row_if``), so every later layer's loss is NaN and
        its update skipped too. After the sweep one read of all the losses (and ``checks``: 1-element bool tensors,
        True = bad, e.g. the labels' range) decides: all fine, every step_count advances; else the step counts of
        the layers that stepped (finite loss) advance and the error names the first failure.
        """
        checks = [] if checks is None else checks
        losses, outputs = [], []
        x_pos = x_neg = None
        try:
            for i, layer in enumerate(self.layers):
                out = first_step(layer) if i == 0 else layer._step(x_pos, x_neg)
                losses.append(out.loss)
                if return_outputs:
                    outputs.append(out)
                x_pos, x_neg = out.h_pos, out.h_neg
                if i + 1 < len(self.layers):
                    x_pos = _nan_first_row_if(~torch.isfinite(out.loss), x_pos)
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
                raise NonFiniteLossError(f"ffkernels: layer {i}: {_non_finite_error(loss)} "
                                         f"(layers 0..{i - 1} were updated)")
        self.head._raise_non_finite(head_loss)

    # ---- inference -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def features(self, x: torch.Tensor, upto: Optional[int] = None) -> list:
        """The activations of every layer (or of layers 0..upto) for input ``x``."""
        feats = []
        for layer in self.layers[: None if upto is None else upto + 1]:
            x = layer.ff_forward(x)  # under autocast: bf16 GEMMs, fp32 activations, as the steps
            feats.append(x)
        return feats

    def goodness(self, x: torch.Tensor) -> torch.Tensor:
        """(…, num_layers): the goodness of ``x`` at every layer."""
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
        for chunk in x.reshape(-1, x.shape[-1]).split(batch_size):
            score = (self.head_logits(chunk, value) if method == "head"
                     else self.goodness_scores(chunk, num_classes, layers, value))
            preds.append(score.argmax(-1))
        return torch.cat(preds).reshape(x.shape[:-1])

    @property
    def backend(self) -> str:
        return self.layers[0].backend
