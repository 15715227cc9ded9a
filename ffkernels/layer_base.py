"""What every FF layer kind shares (FFLinear, FFConv2d): options, optimizer state buffers, the step count, the backend,
the optimizer update from given gradients, and the state_dict rules (docs/design.md, "Public API")."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._types import NonFiniteLossError
from .backends import BACKEND_NAMES, get_backend, resolve_backend
from .backends.contract import autocast_config, check_gemm_dtype, state_dtype
from .step_state import extra_state, load_extra_state


def non_finite_error(loss: torch.Tensor) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"ffkernels: the FF loss is not finite ({loss.item()}); the weights and optimizer state were "
        "left unchanged. Check the inputs for NaN/inf, or lower the learning rate.")


def nan_first_row_if(bad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` with its first row set to NaN where the 0-d bool ``bad`` is True (in place, no host sync).

    This is how a sweep carries "an earlier layer's step was not finite" to the next layer without reading it on
    the host: a NaN row makes that layer's loss NaN (every backend propagates NaN through the normalization, the
    GEMM or convolution and relu), so its update is skipped on the device like any non-finite step. Where ``bad`` is
    False the values are untouched, bit for bit.
    """
    x = x.contiguous()
    if x.numel():
        x.view(-1, x.shape[-1])[:1].masked_fill_(bad, float("nan"))
    return x


def check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"ffkernels: unknown backend {backend!r}; expected 'auto' or one of "
                         f"{', '.join(map(repr, BACKEND_NAMES))}")


def check_num_classes(loss: str, num_classes, out_units: int, what: str) -> Optional[int]:
    """The class groups of the competitive loss: num_classes (an int >= 2 dividing ``out_units``) exactly then."""
    if loss != "competitive":
        if num_classes is not None:
            raise ValueError(f"ffkernels: num_classes is for loss='competitive' (one {what} group per class), "
                             f"got loss={loss!r}")
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"ffkernels: loss='competitive' needs num_classes (an int >= 2), got {num_classes!r}")
    if out_units % num_classes:
        raise ValueError(f"ffkernels: loss='competitive' splits the {out_units} output {what}s into num_classes="
                         f"{num_classes} equal groups; {out_units} is not a multiple of {num_classes}")
    return num_classes


class FFLayerBase(nn.Module):
    """The shared machinery; a layer kind sets ``weight``, ``bias``, ``config``, ``backend_request`` and calls
    ``_finish_init`` (it defines ``reset_parameters`` and its steps)."""

    _peer_units = 0  # units of peer normalization's running mean (FFLinear: out_features); 0: none
    _kernels = "step"  # the backend function the layer's steps need ("conv_step": FFConv2d, FFLinear's conv options)
    _kept_buffers = ("peer_mean",)  # buffers _make_state leaves alone (FFConvBlock2d adds BatchNorm's running stats)

    def _finish_init(self) -> None:
        self.step_count = 0
        self._make_state()
        self.reset_parameters()

    def _params(self):
        return [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None else [])

    def _state_buffer_names(self):
        return [f"{s}_{p}" for s in self.config.state_names for p, _ in self._params()]

    def _make_state(self) -> None:
        keep = self._state_buffer_names() + list(self._kept_buffers)
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
            self.register_buffer("peer_mean", torch.zeros(self._peer_units, dtype=state_dtype(w.dtype),
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

    def _check_options(self, config) -> None:
        """A layer kind refuses options it cannot run (raise ValueError); called on construction and configure."""

    def configure(self, **options):
        """Change options (e.g. ``lr`` for a schedule). Changing the optimizer kind resets its state.

        Turning peer normalization on (peer_norm > 0) adds the buffer peer_mean at zero; turning it off removes it.
        """
        config = self.config.replace(**options)
        self._check_options(config)
        old_names = self.config.state_names
        self.config = config
        if self.config.state_names != old_names:
            self._make_state()
            self.step_count = 0
        self._make_peer_mean()
        return self

    # ---- backend -----------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend that runs this layer's steps for its current device and dtype."""
        return resolve_backend(self.backend_request, self.weight.device, self.weight.dtype, self._kernels)

    def _step_config(self, backend):
        """The layer's options for this call: with the GEMM dtype of the current torch.autocast (docs/design.md,
        "Mixed precision"); a backend without that GEMM dtype raises here, before anything runs."""
        cfg = autocast_config(self.config, self.weight)
        check_gemm_dtype(backend, cfg)
        return cfg

    def _states(self, pname: str):
        return tuple(getattr(self, f"{s}_{pname}") for s in self.config.state_names)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss)):
            raise non_finite_error(loss)

    def _param_views(self):
        return self.weight.detach(), (self.bias.detach() if self.bias is not None else None)

    def ff_update(self, grad_weight: torch.Tensor, grad_bias: Optional[torch.Tensor] = None,
                  loss: Optional[torch.Tensor] = None) -> None:
        """Apply one optimizer update from given gradients (e.g. all-reduced across processes).

        With ``loss`` given and not finite, raises NonFiniteLossError and changes nothing. Not available with
        peer normalization (NotImplementedError): the running mean peer_mean must advance with the batch the
        gradient came from, which the gradient alone does not carry; use ``ff_step``.
        """
        if self.config.peer_norm != 0.0:
            raise NotImplementedError(
                f"ffkernels: {type(self).__name__}.ff_update (the split ff_grad -> ff_update path, e.g. data-parallel "
                f"training) does not support peer normalization (peer_norm={self.config.peer_norm:g}): its running "
                "mean peer_mean must advance with the positive activations of the step's whole batch, which a "
                "gradient does not carry. Use ff_step / ff_step_labeled, or configure(peer_norm=0.0).")
        if grad_weight.shape != self.weight.shape:
            raise ValueError(f"ffkernels: grad_weight must have shape {tuple(self.weight.shape)}, "
                             f"got {tuple(grad_weight.shape)}")
        if (self.bias is None) != (grad_bias is None):
            raise ValueError("ffkernels: grad_bias must be given exactly when the layer has a bias")
        if loss is not None:
            self._check_finite(loss)
        w, b = self._param_views()
        flat = (w.shape[0], -1)  # the update op takes 2-D weights: a conv weight and its state as (C_out, C_in/g*kH*kW)
        with torch.no_grad():
            get_backend(self.backend).update(w.view(flat), b, grad_weight.reshape(flat), grad_bias,
                                             tuple(t.view(flat) for t in self._states("weight")),
                                             self._states("bias") if b is not None else (),
                                             self.step_count + 1, self.config.update_config)
        self.step_count += 1

    # ---- state -------------------------------------------------------------------------------------

    def get_extra_state(self):
        return extra_state(self)

    def set_extra_state(self, state) -> None:
        load_extra_state(self, state, "layer")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = [prefix + n for n in self._own_buffer_names()] + [prefix + "_extra_state"]
        plain = not any(k in state_dict for k in own)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if plain:  # an nn.Linear / nn.Conv2d state_dict: new weights, fresh optimizer
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
