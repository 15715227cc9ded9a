"""Kernel 3 of the Triton backend split over the rows (settings.row_splits): the rule, and the split path against
the oracle. On a GPU the rule splits small layers on its own; the tests force the split so that it also runs under
the interpreter (B = 300 rows per side, three splits of 128, the last one partial), for the plain and the labeled
step, with and without peer normalization, and for ff_grad (kernel 3b writing the gradient)."""
import importlib

import pytest
import torch

import ffkernels
import oracle
from backends import TRITON, TRITON_PACKAGE, backend_params
from tolerance import check_outputs, rule_for
from trajectories import batch, run_and_compare

pytest.importorskip("triton")
settings = importlib.import_module(f"{TRITON_PACKAGE}.settings")
pytestmark = pytest.mark.triton

SPLITS = 3
B = 300  # rows per side: three splits of 128 rows (kernel 3 reduces up to 128 rows per step under the interpreter)


def test_row_split_rule():
    """S = 1 once the W tiles fill the SMs, else about one program per SM with at least MIN_SPLIT_ROWS rows per split
    and side; the splits are whole steps of kernel 3's row block and cover the rows."""
    sms, min_rows = settings.SM_COUNT, settings.MIN_SPLIT_ROWS
    cpu = torch.device("cpu")
    assert settings.row_splits(sms, 100_000, 64, cpu) == (1, 100_000 // 64 * 64 + 64 * (100_000 % 64 > 0))
    # a 256 x 256 bf16 layer (8 tiles) on 132 SMs: 17 splits asked, 4096 / 17 rows rounded up to 256: 16 splits
    assert -(-sms // 8) == 17 and settings.row_splits(8, 4096, 64, cpu) == (16, 256)
    assert settings.row_splits(8, 3 * min_rows + 5, 64, cpu)[0] == 3  # limited by the rows
    assert settings.row_splits(8, min_rows - 1, 32, cpu)[0] == 1
    for programs, b, block_rows in ((1, 300, 128), (7, 1000, 64), (2, 4096, 32), (1, 129, 64)):
        s, rows = settings.row_splits(programs, b, block_rows, cpu)
        assert rows % block_rows == 0 and (s - 1) * rows < b <= s * rows, (programs, b, block_rows, s, rows)
    with settings.force_row_splits(SPLITS):
        assert settings.row_splits(1000, B, 128, cpu) == (3, 128)
        assert settings.row_splits(1000, 100, 128, cpu) == (1, 128)  # no empty split
    assert settings.row_splits(1000, B, 128, cpu)[0] == 1


@pytest.mark.parametrize("backend", backend_params([TRITON]))
@pytest.mark.parametrize("peer,labeled,bias,optimizer", [(False, False, True, "adam"), (True, False, True, "sgd"),
                                                         (False, True, False, "adam"), (True, True, True, "adam")],
                         ids=["plain-adam", "peer-sgd", "labeled-adam-nobias", "labeled-peer-adam"])
def test_split_step_matches_oracle(backend, peer, labeled, bias, optimizer):
    with settings.force_row_splits(SPLITS):
        run_and_compare(backend, B, 40, 24, steps=2, bias=bias, optimizer=optimizer,
                        momentum=0.9 if optimizer == "sgd" else 0.0, peer_norm=0.3 if peer else 0.0,
                        labeled_classes=10 if labeled else None)


@pytest.mark.parametrize("backend", backend_params([TRITON]))
def test_split_grad_matches_oracle(backend):
    cfg = ffkernels.FFConfig(threshold=24.0, peer_norm=0.3)
    gen = torch.Generator().manual_seed(5)
    x_pos, x_neg = batch(gen, B, 40)
    w = torch.randn(24, 40, generator=gen, dtype=torch.float64) / 40 ** 0.5
    b = torch.randn(24, generator=gen, dtype=torch.float64) / 40 ** 0.5
    r = torch.rand(24, generator=gen, dtype=torch.float64)
    dev, dt = backend.device, torch.float32
    args = [t.to(dt).to(dev) for t in (x_pos, x_neg, w, b, r)]
    with settings.force_row_splits(SPLITS):
        ours = ffkernels.ff_grad(*args[:4], cfg, peer_mean=args[4], backend=backend.name)
    same = oracle.ff_grad(*args[:4], cfg, args[4])
    exact = oracle.ff_grad(*[t.double() for t in args[:4]], cfg, args[4].double())
    check_outputs("split ", ours, same, exact, cfg, rule_for(dt, backend.gpu))
