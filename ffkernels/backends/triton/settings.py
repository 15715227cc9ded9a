"""Switches and tile sizes of the Triton backend (host side; nothing here is compiled).

``fp32_precision`` is the ``input_precision`` of every fp32 ``tl.dot``: ``"ieee"`` (the default, exact
fp32 products like torch's own default matmul, and the only choice the interpreter tests use) or
``"tf32"`` (tensor cores on Ampere and newer: faster, ~1e-3 relative error, like
``torch.backends.cuda.matmul.allow_tf32 = True``). fp16/bf16 dots always use the tensor cores with
fp32 accumulation.
"""
from __future__ import annotations

import contextlib
import os

import torch

FP32_PRECISIONS = ("ieee", "tf32")
_fp32_precision = "ieee"


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1): kernels run on the CPU with numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_fp32_precision(precision: str) -> None:
    """Choose the ``tl.dot`` input precision for fp32 tensors: "ieee" (exact, default) or "tf32"."""
    global _fp32_precision
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"ffkernels: unknown fp32 precision {precision!r}; expected one of "
                         f"{', '.join(map(repr, FP32_PRECISIONS))}")
    _fp32_precision = precision


def get_fp32_precision() -> str:
    return _fp32_precision


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` given to tl.dot for operands of ``dtype``."""
    return _fp32_precision if dtype == torch.float32 else "ieee"


# the FFConfig.gemm_dtype values the kernels run (docs/design.md, "Mixed precision")
GEMM_DTYPES = ("param", "bfloat16")


def gemm_code(gemm_dtype: str) -> int:
    """The kernels' ``GEMM`` constexpr for ``FFConfig.gemm_dtype`` (ff_math.py's GEMM_* codes): 0 for "param" (the
    kernels exactly as before autocast existed); for "bfloat16" 1 on GPUs (bf16 tl.dot operands), 2 under the
    interpreter (bf16 values in an fp32 "ieee" dot: the interpreter's own bf16 dot and fp32 -> bf16 cast are wrong).
    The ops refuse the other values before this is asked (float16: not implemented)."""
    if gemm_dtype == "param":
        return 0
    if gemm_dtype != "bfloat16":
        raise ValueError(f"ffkernels: the Triton kernels have no {gemm_dtype} GEMMs")
    return 2 if interpreting() else 1


def supported_dtypes() -> tuple:
    """fp32 under the interpreter (numpy has no bf16 and the tests are fp32); fp32/fp16/bf16 on GPUs."""
    if interpreting():
        return (torch.float32,)
    return (torch.float32, torch.float16, torch.bfloat16)


def block(n: int, hi: int) -> int:
    """A power-of-two tile edge covering ``n``, at least 16 (the smallest tl.dot edge) and at most ``hi``."""
    b = 16
    while b < n and b < hi:
        b *= 2
    return b


# Tile sizes and warps per kernel. The interpreter runs a program per tile in Python, so fewer, larger tiles are
# much faster there (128 edges whatever the dtype). On GPUs the tiles bound registers and shared memory: each config
# below is one whose every kernel variant (options, peer normalization) compiles for sm_90 without register spills
# (tests/test_triton_ptxas.py compiles them and reports registers and spills). They are fixed, not autotuned: the
# fused step updates W in place, so autotuning it would need the parameters and optimizer state restored after
# every trial; and they have not been timed on hardware.
#
# "aligned": every row length the kernel walks (N, K) is a multiple of 16 elements and the tensors are 16-byte
# aligned, which is what Triton's specialization needs to vectorize the loads; otherwise every element gets its
# own address and load, and the unaligned configs (more warps, smaller tiles) keep that in registers.
NUM_WARPS = 4


def _aligned16(t: torch.Tensor) -> bool:
    try:
        return t.data_ptr() % 16 == 0
    except RuntimeError:  # no data while torch.compile traces: storages are aligned, so a view is where it starts
        return t.storage_offset() * t.element_size() % 16 == 0


def is_aligned(*tensors, sizes=()) -> bool:
    """Whether Triton's specialization sees every tensor 16-byte aligned and every size a multiple of 16."""
    return all(t is None or _aligned16(t) for t in tensors) and all(n % 16 == 0 for n in sizes)


def forward_config(dtype: torch.dtype, N: int, K: int, B: int, aligned: bool = True, labeled: bool = False) -> dict:
    """Kernel 1's (and 1L's, ``labeled``) tile, ``m`` rows x ``n`` units x ``k`` features per step, and ``warps``:
      fp32         64 x 64 x 32, 4 warps; 8 warps unaligned
      fp16/bf16    64 x 128 x 64, 4 warps; 64 x 64 x 32, 8 warps unaligned
    and kernel 1L always 8 warps: its epilogue holds two h tiles and their gathered label columns."""
    if interpreting():
        return {"m": block(B, 128), "n": block(N, 128), "k": block(K, 128), "warps": NUM_WARPS}
    if dtype == torch.float32:
        m, n, k, warps = 64, 64, 32, (NUM_WARPS if aligned and not labeled else 8)
    elif aligned:
        m, n, k, warps = 64, 128, 64, (8 if labeled else NUM_WARPS)
    else:
        m, n, k, warps = 64, 64, 32, 8
    return {"m": block(B, m), "n": block(N, n), "k": block(K, k), "warps": warps}


# ---- kernel 3 (weight_grad_kernel.py) --------------------------------------------------------------------------

def weight_grad_config(dtype: torch.dtype, N: int, K: int, B: int, aligned: bool = True,
                       labeled: bool = False, autocast: bool = False) -> dict:
    """Kernel 3's W tile (``n`` x ``k``), the rows it reduces per step (``rows``) and its ``warps``:
      fp32              32 x 32 tile, 32 rows per step, 4 warps; 64 x 32 and 8 warps unaligned
      fp16/bf16         64 x 64 tile, 64 rows per step, 8 warps (the Adam epilogue holds the tile's p, m, v and
                        gradient in registers: at 4 warps it spilled, and a 128 x 64 tile spilled with triton 3.6)
    Every config compiles without spills for sm_90 with triton 3.8 and 3.6 (docs/triton.md, test_triton_ptxas.py).
      fp16/bf16, 1L     64 x 64 tile, 32 rows per step, 8 warps (``labeled``: each step forms both sides' dL/dz
                        and, in the tiles with label columns, both explicit rows)
      autocast          (``dtype`` bf16, the operands of float32 weights) 64 x 64 tile, 32 rows per step, 8 warps: h is
                        float32 there, and with 64 rows the unaligned variants spilled on sm_90 (up to 196 B)
    """
    if interpreting():
        return {"n": block(N, 128), "k": block(K, 128), "rows": block(B, 128), "warps": NUM_WARPS}
    if dtype == torch.float32:
        n, k, rows, warps = (32, 32, 32, 4) if aligned else (64, 32, 32, 8)
    elif labeled or autocast:
        n, k, rows, warps = 64, 64, 32, 8
    else:
        n, k, rows, warps = 64, 64, 64, 8
    return {"n": block(N, n), "k": block(K, k), "rows": block(B, rows), "warps": warps}


# The split of kernel 3 over the rows. Kernel 3 has one program per W tile, (N/BN)(K/BK), each reducing over all
# 2B rows; a small layer has fewer tiles than the GPU has SMs (a 256 x 256 bf16 layer: 8 of an H200's 132), and
# most SMs would idle. The rule: with P programs on a GPU of M SMs and B rows per side,
#     S = 1                                  when P >= M (the GPU is full), else
#     S = min(ceil(M / P), B // MIN_SPLIT_ROWS)   (about one program per SM, each split at least MIN_SPLIT_ROWS
#                                                  rows per side, so its partial tile's store pays for itself)
# and with S > 1 each split writes an fp32 partial of dW (and db) into an (S, N, K) buffer, which kernel 3b adds in
# split order before the epilogue (store, or the optimizer): deterministic, no atomics. The splits cover the rows
# in blocks of ``rows`` (kernel 3's step), so S can come out smaller than asked.
SM_COUNT = 132  # an H200's (and an H100 SXM's) SMs: the rule's M where there is no GPU to ask (the interpreter)
MIN_SPLIT_ROWS = 128
_forced_splits = None


def sm_count(device) -> int:
    """The SMs of ``device`` when it is a CUDA GPU, else SM_COUNT."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM_COUNT


def row_splits(programs: int, B: int, block_rows: int, device) -> tuple:
    """(S, rows per side of one split) for kernel 3 with ``programs`` W tiles over B rows per side (the rule above,
    or the number forced by ``force_row_splits``)."""
    s = _forced_splits
    if s is None:
        sms = sm_count(device)
        s = 1 if programs >= sms else min(-(-sms // programs), B // MIN_SPLIT_ROWS)
    s = max(1, min(s, -(-B // block_rows)))
    rows = -(-B // s)
    rows = -(-rows // block_rows) * block_rows  # whole steps of kernel 3
    return -(-B // rows), rows


@contextlib.contextmanager
def force_row_splits(splits: int):
    """Within the block, kernel 3 splits the rows into ``splits`` parts (at most one per block of rows) whatever the
    rule says: for tests, which run the split path on small shapes."""
    global _forced_splits
    before, _forced_splits = _forced_splits, splits
    try:
        yield
    finally:
        _forced_splits = before


# ---- the conv step's kernels (conv_forward_kernel.py, conv_weight_grad_kernel.py) --------------------------------
# An implicit GEMM: M = images x output pixels, N = the output channels of one conv group, K = its input channels x kH
# x kW. The rows of x are gathered (im2col on the fly), never contiguous, so there is no aligned variant; the weight
# rows are. On GPUs every config compiles for sm_90 without spills (tests/test_triton_conv_ptxas.py).

_forced_conv_tiles = None


@contextlib.contextmanager
def force_conv_tiles(edge: int):
    """Within the block, every tile edge of the conv kernels (rows, channels, features) is at most ``edge`` (a power of
    two >= 16) whatever the defaults say: for tests, which run the paths of several N-, K- and M-tiles (partials of one
    class group in two tiles, the K loop) on small shapes under the interpreter."""
    global _forced_conv_tiles
    before, _forced_conv_tiles = _forced_conv_tiles, edge
    try:
        yield
    finally:
        _forced_conv_tiles = before


def _conv_tiles(cfg: dict) -> dict:
    if _forced_conv_tiles is None:
        return cfg
    return {key: min(v, _forced_conv_tiles) if key != "warps" else v for key, v in cfg.items()}


def conv_forward_config(dtype: torch.dtype, n: int, k: int, rows: int) -> dict:
    """The conv forward's tile: ``m`` output pixels x ``n`` channels of a conv group x ``k`` of its (C_in/groups) kH kW
    features per step, and ``warps``: 64 x 64 x 16, 8 warps, every dtype (the N edge shrinks to the group's channels,
    at least 16). The gathered x tile holds a 64-bit address per element and the epilogue an fp64 goodness tile: with
    4 warps, or 32 features per step, the CNN recipe's layers spilled on sm_90 (up to 496 B in bf16)."""
    if interpreting():
        return _conv_tiles({"m": block(rows, 128), "n": block(n, 128), "k": block(k, 128), "warps": NUM_WARPS})
    return _conv_tiles({"m": block(rows, 64), "n": block(n, 64), "k": block(k, 16), "warps": 8})


def conv_weight_grad_config(dtype: torch.dtype, n: int, k: int, rows: int) -> dict:
    """The conv weight gradient's W tile (``n`` channels x ``k`` features), the output pixels it reduces per step
    (``rows``) and ``warps``, kernel 3's tiles (``weight_grad_config``) with more warps or fewer rows, for the gathers'
    addresses (at kernel 3's own configs the CNN recipe's layers spilled on sm_90):
      fp32         32 x 32 tile, 32 rows per step, 8 warps
      fp16/bf16    64 x 64 tile, 32 rows per step, 8 warps"""
    if interpreting():
        return _conv_tiles({"n": block(n, 128), "k": block(k, 128), "rows": block(rows, 128), "warps": NUM_WARPS})
    if dtype == torch.float32:
        n_, k_, rows_, warps = 32, 32, 32, 8
    else:
        n_, k_, rows_, warps = 64, 64, 32, 8
    return _conv_tiles({"n": block(n, n_), "k": block(k, k_), "rows": block(rows, rows_), "warps": warps})
