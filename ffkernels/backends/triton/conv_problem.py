"""The sizes of one conv FF step, computed once on the host and handed to the conv kernels (nothing here is compiled).

The conv step is an implicit GEMM per conv group: M = images x output pixels (per side: pos, then neg), N = the group's
output channels, K = its input channels x kH x kW, gathered on the fly (conv_im2col.py). The goodness layout says what
one goodness value sums over (docs/design.md, "Convolutional FF"): "sample" (one value per image), "location" (one per
output pixel), "group" (one per class group of ``per_class`` consecutive channels, the competitive loss).
"""
from __future__ import annotations

from typing import NamedTuple

from ..contract_conv import conv_out_size

OVER_CODES = {"sample": 0, "location": 1, "group": 2}


class ConvProblem(NamedTuple):
    B: int  # images per side
    sides: int  # 2 (pos, neg: hinton, symba) or 1 (competitive)
    C_in: int
    H: int
    W: int
    C_out: int
    KH: int
    KW: int
    groups: int
    stride: tuple
    padding: tuple
    dilation: tuple
    Ho: int
    Wo: int
    over: str  # goodness_over
    per_class: int  # channels per class group ("group"); 1 otherwise

    @property
    def P(self) -> int:
        """Output pixels per image."""
        return self.Ho * self.Wo

    @property
    def cg_in(self) -> int:
        return self.C_in // self.groups

    @property
    def cg_out(self) -> int:
        return self.C_out // self.groups

    @property
    def kg(self) -> int:
        """The GEMM's K: one conv group's input channels x kH x kW (the weight's row length)."""
        return self.cg_in * self.KH * self.KW

    @property
    def ng(self) -> int:
        """Goodness values per image: 1, P or the number of class groups."""
        return {"sample": 1, "location": self.P, "group": self.C_out // self.per_class}[self.over]

    @property
    def summed(self) -> int:
        """How many h values one goodness sums over (the "mean" divisor)."""
        return {"sample": self.C_out * self.P, "location": self.C_out, "group": self.per_class * self.P}[self.over]

    @property
    def g_shape(self) -> tuple:
        return {"sample": (self.B,), "location": (self.B, self.Ho, self.Wo), "group": (self.B, self.ng)}[self.over]

    def geometry_args(self) -> dict:
        """The kernels' geometry arguments (conv_im2col.py's names)."""
        return dict(C_in=self.C_in, H=self.H, W=self.W, C_out=self.C_out, Wo=self.Wo, P=self.P, KH=self.KH,
                    KW=self.KW, stride_h=self.stride[0], stride_w=self.stride[1], pad_h=self.padding[0],
                    pad_w=self.padding[1], dil_h=self.dilation[0], dil_w=self.dilation[1])

    def partial_layout(self, tile_n: int) -> tuple:
        """(N-tiles per conv group, N-tiles in all, J) of the forward's goodness partials with ``tile_n`` channels per
        tile: each tile stores, per output pixel, the sum of h^p over its channels of each goodness value it touches,
        J slots (1, except for "group": the most class groups one tile's channels touch)."""
        per_group = -(-self.cg_out // tile_n)
        tiles = self.groups * per_group
        if self.over != "group":
            return per_group, tiles, 1
        j = 1
        for t in range(tiles):
            g, nt = divmod(t, per_group)
            first = g * self.cg_out + nt * tile_n
            last = g * self.cg_out + min(nt * tile_n + tile_n, self.cg_out) - 1
            j = max(j, last // self.per_class - first // self.per_class + 1)
        return per_group, tiles, j


def conv_problem(x_pos, weight, stride, padding, dilation, groups: int, sides: int, over: str,
                 num_classes: int) -> ConvProblem:
    """The sizes of a conv step on x (B, C_in, H, W) with weight (C_out, C_in/groups, kH, kW) (checked before)."""
    B, C_in, H, W = x_pos.shape
    C_out, _, KH, KW = weight.shape
    Ho, Wo = (conv_out_size((H, W)[i], (KH, KW)[i], stride[i], padding[i], dilation[i]) for i in range(2))
    per_class = C_out // num_classes if over == "group" else 1
    return ConvProblem(B, sides, C_in, H, W, C_out, KH, KW, groups, tuple(stride), tuple(padding), tuple(dilation),
                       Ho, Wo, over, per_class)
