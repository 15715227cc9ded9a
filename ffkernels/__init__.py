"""ffkernels: fused Forward-Forward training kernels for PyTorch, and an FF-vs-BP study harness.

    import ffkernels
    layer = ffkernels.FFLinear(784, 2000)          # drop-in nn.Linear + ReLU
    out = layer.ff_step(x_pos, x_neg)              # one fused FF step: loss, h, g, in-place update
    net = ffkernels.FFNet([784, 2000, 2000])       # greedy layer-local training in one sweep
    net = ffkernels.FFNet([784, 2000, 2000], head=True, num_classes=10)  # + a softmax head, one-pass predict
"""
from ._types import BackendUnavailableError, FFGradOutput, FFStepOutput, NonFiniteLossError
from .backends import available_backends, resolve_backend
from .config import FFConfig
from .functional import ff_grad, ff_step, ff_update
from . import augment, schedules
from .head import SoftmaxHead
from .labels import embed_label, embed_neutral, ff_pair, hard_negatives, wrong_labels
from .conv import FFConv2d
from .conv_block import FFConvBlock2d
from .linear import FFLinear
from .net import FFNet, FFNetStepOutput

__version__ = "0.1.0"

__all__ = [
    "FFLinear", "FFConv2d", "FFConvBlock2d", "FFNet", "FFNetStepOutput", "FFConfig", "FFStepOutput", "FFGradOutput", "NonFiniteLossError",
    "BackendUnavailableError", "available_backends", "resolve_backend", "ff_step", "ff_grad", "ff_update",
    "embed_label", "embed_neutral", "wrong_labels", "hard_negatives", "ff_pair", "SoftmaxHead", "schedules",
    "augment",
]
