"""The one place the tests import the oracle from: autograd + torch.optim, written plainly from the math.

Everything the tests compare a backend with comes through this module, so moving the oracle (e.g. to
ffkernels.backends.reference) is a one-line change here.
"""
from ffkernels.backends.reference import (
    FFLayerRef,
    ff_grad,
    ff_loss,
    ff_objective,
    goodness,
    layer_forward,
    optimizer_update,
)

__all__ = ["FFLayerRef", "ff_grad", "ff_loss", "ff_objective", "goodness", "layer_forward", "optimizer_update"]
