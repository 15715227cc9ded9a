"""FFLinear (a drop-in nn.Linear + ReLU that trains itself with Forward-Forward) and FFNet."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from ._types import FFGradOutput, FFStepOutput, NonFiniteLossError
from .backends import BACKEND_NAMES, get_backend, resolve_backend
from .backends import reference as ref
from .backends.contract import check_ff_inputs, state_dtype
from .config import FFConfig
from .labels import embed_label

_STATE_VERSION = 1


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
            raise NonFiniteLossError(
                f"ffkernels: the FF loss is not finite ({loss.item()}); the weights and optimizer state were "
                "left unchanged. Check the inputs for NaN/inf, or lower the learning rate.")

    def _param_views(self):
        return self.weight.detach(), (self.bias.detach() if self.bias is not None else None)

    def ff_step(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> FFStepOutput:
        """One FF training step on positives ``x_pos`` and negatives ``x_neg`` of shape (..., in_features).

        Returns loss, h_pos, h_neg, g_pos, g_neg (computed with the weights before the update) and updates
        the layer in place. Raises NonFiniteLossError, changing nothing, if the loss is not finite.
        """
        xp, xn, lead = self._flatten_inputs(x_pos, x_neg)
        w, b = self._param_views()
        with torch.no_grad():
            out = get_backend(self.backend).step(xp, xn, w, b, self._states("weight"),
                                                 self._states("bias") if b is not None else (),
                                                 self.step_count + 1, self.config, peer_mean=self._peer_mean())
        self._check_finite(out.loss)
        self.step_count += 1
        return FFStepOutput(out.loss, out.h_pos.reshape(*lead, -1), out.h_neg.reshape(*lead, -1),
                            out.g_pos.reshape(lead), out.g_neg.reshape(lead))

    def ff_step_labeled(self, x: torch.Tensor, labels_pos: torch.Tensor, labels_neg: torch.Tensor,
                        num_classes: int, value: float = 1.0) -> FFStepOutput:
        """``ff_step(embed_label(x, labels_pos), embed_label(x, labels_neg))`` for Hinton-style supervised FF.

        Positive and negative share every feature but the label slots, so backends that can (``cpu``) compute
        the shared part once: B-row GEMMs instead of 2B-row ones. Others build the pair and call ``ff_step``.
        """
        fused = getattr(get_backend(self.backend), "step_labeled", None)
        if fused is None or not isinstance(x, torch.Tensor) or x.dim() != 2:
            return self.ff_step(embed_label(x, labels_pos, num_classes, value),
                                embed_label(x, labels_neg, num_classes, value))
        check_ff_inputs(x, x, self.weight, self.bias)
        w, b = self._param_views()
        with torch.no_grad():
            out = fused(x.detach(), torch.as_tensor(labels_pos), torch.as_tensor(labels_neg), num_classes,
                        float(value), w, b, self._states("weight"), self._states("bias") if b is not None else (),
                        self.step_count + 1, self.config, peer_mean=self._peer_mean())
        self._check_finite(out.loss)
        self.step_count += 1
        return out

    def ff_grad(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> FFGradOutput:
        """The local FF gradient (and loss, h, g) without updating anything (see ``ff_update``).

        With peer normalization it reads the running mean peer_mean (the loss and gradient include L_peer) but
        does not update it.
        """
        xp, xn, lead = self._flatten_inputs(x_pos, x_neg)
        w, b = self._param_views()
        with torch.no_grad():
            out = get_backend(self.backend).grad(xp, xn, w, b, self.config, peer_mean=self._peer_mean())
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
        return ref.layer_forward(x, self.weight, self.bias, self.config.norm, self.config.norm_eps)

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
        return {"version": _STATE_VERSION, "step": self.step_count, "config": self.config.to_dict()}

    def set_extra_state(self, state) -> None:
        saved = state.get("config", {})
        if saved.get("optimizer", self.config.optimizer) != self.config.optimizer:
            raise ValueError(f"ffkernels: this state_dict was trained with optimizer {saved['optimizer']!r} but the "
                             f"layer uses {self.config.optimizer!r}; construct the layer with the same optimizer")
        self.step_count = int(state["step"])

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
    losses: torch.Tensor           # (num_layers,) the loss of each layer
    outputs: Optional[list]        # per-layer FFStepOutput when return_outputs=True


class FFNet(nn.Module):
    """A stack of FFLinear layers trained greedily: layer l+1 learns from layer l's activations.

    ``dims`` = [in_features, width_1, ..., width_L]; keyword options go to every FFLinear.
    ``predict_layers``: the layers whose goodness is summed for prediction (default: all but the first
    when there are several, as in Hinton 2022).
    """

    def __init__(self, dims: Sequence[int], bias: bool = True, *, predict_layers=None, **layer_kwargs):
        super().__init__()
        dims = list(dims)
        if len(dims) < 2:
            raise ValueError(f"ffkernels: dims needs an input size and at least one layer width, got {dims}")
        self.dims = dims
        self.layers = nn.ModuleList(FFLinear(a, b, bias, **layer_kwargs) for a, b in zip(dims[:-1], dims[1:]))
        n = len(self.layers)
        if predict_layers is None:
            predict_layers = list(range(1, n)) if n > 1 else [0]
        predict_layers = [int(i) for i in predict_layers]
        if not predict_layers or any(not -n <= i < n for i in predict_layers):
            raise ValueError(f"ffkernels: predict_layers must name layers in [0, {n}), got {predict_layers}")
        self.predict_layers = [i % n for i in predict_layers]

    def ff_step(self, x_pos: torch.Tensor, x_neg: torch.Tensor, return_outputs: bool = False) -> FFNetStepOutput:
        """Train every layer in one sweep on (x_pos, x_neg).

        If layer l's loss is not finite, NonFiniteLossError is raised naming it: layers before l have taken
        their (finite) step, layer l and those after it are unchanged.
        """
        return self._sweep(lambda layer: layer.ff_step(x_pos, x_neg), return_outputs)

    def ff_step_labeled(self, x: torch.Tensor, labels_pos: torch.Tensor, labels_neg: torch.Tensor,
                        num_classes: int, value: float = 1.0, return_outputs: bool = False) -> FFNetStepOutput:
        """``ff_step`` on x with labels_pos (positives) / labels_neg (negatives) written into it.

        The first layer uses FFLinear.ff_step_labeled (shared GEMMs for pos and neg where the backend can).
        """
        return self._sweep(lambda layer: layer.ff_step_labeled(x, labels_pos, labels_neg, num_classes, value),
                           return_outputs)

    def _sweep(self, first_step, return_outputs: bool) -> FFNetStepOutput:
        losses, outputs = [], []
        x_pos = x_neg = None
        for i, layer in enumerate(self.layers):
            try:
                out = first_step(layer) if i == 0 else layer.ff_step(x_pos, x_neg)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"ffkernels: layer {i}: {e} (layers 0..{i - 1} were updated)") from e
            losses.append(out.loss)
            if return_outputs:
                outputs.append(out)
            x_pos, x_neg = out.h_pos, out.h_neg
        return FFNetStepOutput(torch.stack(losses), outputs if return_outputs else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def features(self, x: torch.Tensor) -> list:
        """The activations of every layer for input ``x``."""
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats

    def goodness(self, x: torch.Tensor) -> torch.Tensor:
        """(…, num_layers): the goodness of ``x`` at every layer."""
        kind = [layer.config.goodness for layer in self.layers]
        return torch.stack([ref.goodness(h, k) for h, k in zip(self.features(x), kind)], dim=-1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, num_classes: int, layers=None, value: float = 1.0,
                batch_size: int = 1024) -> torch.Tensor:
        """The label whose one-hot, written into ``x``, gives the highest goodness over ``layers``."""
        layers = self.predict_layers if layers is None else [i % len(self.layers) for i in layers]
        preds = []
        for chunk in x.reshape(-1, x.shape[-1]).split(batch_size):
            labels = torch.arange(num_classes, device=x.device).repeat_interleave(chunk.shape[0])
            xs = embed_label(chunk.repeat(num_classes, 1), labels, num_classes, value)
            score = self.goodness(xs)[:, layers].sum(-1).view(num_classes, -1)
            preds.append(score.argmax(0))
        return torch.cat(preds).reshape(x.shape[:-1])

    @property
    def backend(self) -> str:
        return self.layers[0].backend
