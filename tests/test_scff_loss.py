"""The scff loss (SCFF, Chen et al. 2024, arXiv 2409.11593; docs/design.md, "The math"): per pair
softplus(θ₊ − g⁺) + softplus(g⁻ − θ₋) + λ|g⁺|, summed over the pairs and divided by 2B, as hinton.

The option sweeps run it like every other loss (options.py's "scff" kind in test_training_vs_oracle.py and the Triton
and autocast sweeps, the scff sample of samples.py, test_conv_cpu.py's scff cases; the oracle against the formulas in
test_oracle_formulas.py and test_conv_layer.py). Here, what those do not say:
- with θ₋ = θ₊ and λ = 0 it is hinton bit for bit on every backend (linear: the pair step, the split grad, the labeled
  first layer, peer normalization; conv: per-sample and per-location goodness), over several steps;
- each backend's loss and gradient against the formula written out below, in float64 (float32 under the Triton
  interpreter), and λ's share of both on its own;
- the options: FFConfig's one-line checks, threshold_neg's resolution, the options strings carrying both keys, the
  ``ffkernels train`` flags.
"""
import pytest
import torch

import oracle
import ffkernels
from backends import CPU, CUDA_BACKEND, REFERENCE, backend_params
from ffkernels import FFConfig, FFConv2d, FFLinear, wrong_labels
from ffkernels.config import CONV_OPTION_KEYS, OP_OPTION_KEYS
from tolerance import check, rule_for

FP32, FP64 = torch.float32, torch.float64
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT[t.element_size()])


def assert_same_bits(name: str, a, b) -> None:
    """a and b are the same bits (NaN payloads and the sign of zero included), or both None."""
    if a is None or b is None:
        assert a is None and b is None, name
        return
    assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype} {tuple(a.shape)}, {b.dtype} {tuple(b.shape)}"
    assert torch.equal(_bits(a), _bits(b)), f"{name}: not the same bits"


def _tensors(module) -> dict:
    """The module's state_dict tensors: weight, bias, optimizer state, peer_mean (not the extra state, whose config
    names the loss)."""
    return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_same_module(prefix: str, a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert_same_bits(f"{prefix}{k}", ta[k], tb[k])


def _pairs(gen, B, K):
    """Positives and negatives from different distributions (trajectories.batch): pairs the layer separates and
    pairs it does not, so both softplus regimes meet."""
    return torch.randn(B, K, generator=gen, dtype=FP64) + 0.5, 1.5 * torch.randn(B, K, generator=gen, dtype=FP64)


# ---- θ₋ = θ₊ and λ = 0: hinton, bit for bit -------------------------------------------------------------------------

LINEAR_MODES = {  # mode -> (FFLinear options, the step): the paths of every kernel that calls the pair terms
    "pair-sum-adam": (dict(), "pair"),
    "pair-mean-sgd-momentum-peer": (dict(goodness="mean", threshold=0.3, optimizer="sgd", lr=0.05, momentum=0.9,
                                         peer_norm=0.4, peer_momentum=0.8), "pair"),
    "split-grad-then-update": (dict(threshold=5.0, optimizer="adam", weight_decay=0.01), "split"),
    "labeled-first-layer": (dict(norm="l2", threshold=0.05), "labeled"),
    "labeled-peer": (dict(goodness="mean", threshold=0.02, peer_norm=0.3), "labeled"),
}


@pytest.mark.parametrize("mode", list(LINEAR_MODES))
@pytest.mark.parametrize("backend", backend_params())
def test_linear_scff_with_one_threshold_and_no_penalty_is_hinton_bit_for_bit(backend, mode):
    """FFLinear(loss="scff") with threshold_neg left None (= threshold) and scff_lambda 0 against FFLinear(loss=
    "hinton") from the same weights, on the same batches: loss, h, g (and the gradient, for the split step), weights,
    optimizer state and r, the same bits after each of three steps."""
    opts, how = LINEAR_MODES[mode]
    B, K, N, C = 7, 20, 9, 4
    dev, dtype = backend.device, backend.dtypes[0]
    layers = []
    for loss in ("hinton", "scff"):
        torch.manual_seed(0)
        layers.append(FFLinear(K, N, backend=backend.name, device=dev, dtype=dtype, loss=loss, **opts))
    hinton, scff = layers
    assert scff.config.threshold_neg == scff.config.threshold and scff.config.scff_lambda == 0.0
    assert scff.config.replace(loss="hinton") == hinton.config
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        xp, xn = (x.to(dev, dtype) for x in _pairs(gen, B, K))
        if how == "labeled":
            y = torch.randint(0, C, (B,), generator=gen)
            args = (xp, y.to(dev), wrong_labels(y, C, gen).to(dev), C)
            outs = [layer.ff_step_labeled(*args) for layer in layers]
        elif how == "split":
            grads = [layer.ff_grad(xp, xn) for layer in layers]
            for name, a, b in zip(grads[0]._fields, *grads):
                assert_same_bits(f"step {step} grad {name}", a, b)
            for layer, g in zip(layers, grads):
                layer.ff_update(g.grad_weight, g.grad_bias, loss=g.loss)
            outs = grads
        else:
            outs = [layer.ff_step(xp, xn) for layer in layers]
        for name, a, b in zip(outs[0]._fields, *outs):
            assert_same_bits(f"step {step} {name}", a, b)
        _assert_same_module(f"step {step} ", hinton, scff)
    assert hinton.step_count == scff.step_count == 3


CONV_BACKENDS = backend_params((REFERENCE, CPU, CUDA_BACKEND))


@pytest.mark.parametrize("over,opts", [
    ("sample", dict(goodness="sum", threshold=20.0)),
    ("location", dict(goodness="mean", goodness_power=1, optimizer="sgd", lr=0.05, momentum=0.5)),
], ids=["sample-sum-adam", "location-mean-p1-sgd"])
@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_scff_with_one_threshold_and_no_penalty_is_hinton_bit_for_bit(backend, over, opts):
    """FFConv2d(loss="scff") with threshold_neg = threshold and scff_lambda 0 against FFConv2d(loss="hinton"): the
    gradient, loss, h, g, weights and state, the same bits over three steps (every goodness value a pair)."""
    dev, dtype = backend.device, backend.dtypes[0]
    layers = []
    for loss, extra in (("hinton", {}), ("scff", dict(threshold_neg=opts.get("threshold"), scff_lambda=0.0))):
        torch.manual_seed(0)
        layers.append(FFConv2d(2, 6, 3, padding=1, stride=(1, 2), goodness_over=over, loss=loss,
                               backend=backend.name, device=dev, dtype=dtype, **opts, **extra))
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        xp = (torch.randn(5, 2, 7, 6, generator=gen, dtype=FP64) + 0.5).to(dev, dtype)
        xn = (1.5 * torch.randn(5, 2, 7, 6, generator=gen, dtype=FP64)).to(dev, dtype)
        grads = [layer.ff_grad(xp, xn) for layer in layers]
        for name, a, b in zip(grads[0]._fields, *grads):
            assert_same_bits(f"step {step} grad {name}", a, b)
        outs = [layer.ff_step(xp, xn) for layer in layers]
        for name, a, b in zip(outs[0]._fields, *outs):
            assert_same_bits(f"step {step} {name}", a, b)
        _assert_same_module(f"step {step} ", *layers)


# ---- the formula, written out ----------------------------------------------------------------------------------------

def scff_by_hand(xp, xn, w, b, cfg):
    """(loss, dW, db) in float64 from docs/design.md's formulas: x̂, h = relu(x̂Wᵀ + b), g = s Σ h², the per-pair terms
    softplus(θ₊ − g⁺) + softplus(g⁻ − θ₋) + λ|g⁺| over 2B, dL/dg⁺ = (−σ(θ₊ − g⁺) + λ sign g⁺)/(2B),
    dL/dg⁻ = σ(g⁻ − θ₋)/(2B), dL/dz = 2 s dL/dg · h."""
    def x_hat(x):
        if cfg.norm == "none":
            return x
        ss = (x * x).sum(1, keepdim=True)
        return x / (torch.sqrt(ss / x.shape[1] if cfg.norm == "rms" else ss) + cfg.norm_eps)

    B, N = xp.shape[0], w.shape[0]
    s = 1.0 if cfg.goodness == "sum" else 1.0 / N
    xhp, xhn = x_hat(xp), x_hat(xn)
    hp, hn = ((xh @ w.T + (0.0 if b is None else b)).clamp_min(0) for xh in (xhp, xhn))
    gp, gn = s * (hp * hp).sum(1), s * (hn * hn).sum(1)
    tp, tn, lam = cfg.threshold, cfg.threshold_neg, cfg.scff_lambda
    sp = lambda t: torch.log1p(torch.exp(-t.abs())) + t.clamp_min(0)  # noqa: E731
    sig = lambda t: 1.0 / (1.0 + torch.exp(-t))  # noqa: E731
    loss = (sp(tp - gp) + sp(gn - tn) + lam * gp.abs()).sum() / (2 * B)
    dgp, dgn = (-sig(tp - gp) + lam * torch.sign(gp)) / (2 * B), sig(gn - tn) / (2 * B)
    dzp, dzn = (2 * s * dgp)[:, None] * hp, (2 * s * dgn)[:, None] * hn
    return loss, dzp.T @ xhp + dzn.T @ xhn, None if b is None else dzp.sum(0) + dzn.sum(0)


FORMULA_CASES = {
    "rms-sum": dict(loss="scff", norm="rms", goodness="sum", threshold=6.0, threshold_neg=9.0, scff_lambda=0.05),
    "l2-mean": dict(loss="scff", norm="l2", goodness="mean", threshold=0.01, threshold_neg=0.004, scff_lambda=0.7,
                    norm_eps=0.1),
    "none-sum-nobias": dict(loss="scff", norm="none", goodness="sum", threshold=30.0, threshold_neg=50.0,
                            scff_lambda=0.2),
}


@pytest.mark.parametrize("case", list(FORMULA_CASES))
@pytest.mark.parametrize("backend", backend_params())
def test_loss_and_gradient_are_the_written_formula(backend, case):
    """ff_grad of every backend against scff_by_hand, with the case's λ and with λ = 0: float64 within tolerance.py's
    1e-11 (float32 under the Triton interpreter: its rule, the float32 oracle giving the precision's own error). And
    λ's share of the loss alone, L(λ) − L(0) = λ Σ g⁺ / (2B), which no hinton code path computes."""
    cfg = FFConfig(**FORMULA_CASES[case])
    dev, dtype = backend.device, backend.dtypes[-1]
    gen = torch.Generator().manual_seed(5)
    B, K, N = 6, 11, 7
    xp, xn = _pairs(gen, B, K)
    w = torch.randn(N, K, generator=gen, dtype=FP64) * K ** -0.5 * (3.0 if cfg.norm == "none" else 1.0)
    b = None if "nobias" in case else 0.1 * torch.randn(N, generator=gen, dtype=FP64)
    xp, xn, w, b = (None if t is None else t.to(dtype).double() for t in (xp, xn, w, b))  # exactly what runs
    run = [None if t is None else t.to(dev, dtype) for t in (xp, xn, w, b)]
    rule = rule_for(dtype, backend.gpu)
    got = {}
    for lam in (cfg.scff_lambda, 0.0):
        c = cfg.replace(scff_lambda=lam)
        ours = ffkernels.ff_grad(*run, c, backend=backend.name)
        same = oracle.ff_grad(*run, c) if dtype != FP64 else None
        for name, t in zip(("loss", "grad_weight", "grad_bias"), scff_by_hand(xp, xn, w, b, c)):
            a = getattr(ours, name)
            if t is None:
                assert a is None, name
                continue
            check(f"lambda {lam:g} {name}", a.cpu(), t if same is None else getattr(same, name).cpu(), t, rule)
        got[lam] = ours
    l1, l0 = (float(got[lam].loss) for lam in (cfg.scff_lambda, 0.0))
    share = cfg.scff_lambda * float(got[0.0].g_pos.double().sum()) / (2 * B)
    assert share > 1e-3 * l1, "the penalty should move the loss"
    assert abs((l1 - l0) - share) <= (1e-11 if dtype == FP64 else 1e-5) * max(l1, 1.0)


# ---- the options -----------------------------------------------------------------------------------------------------

def test_threshold_neg_none_is_the_resolved_threshold():
    assert FFConfig().threshold_neg == 1.0 and FFConfig(threshold=2.5).threshold_neg == 2.5
    assert FFConfig(threshold=2.5, threshold_neg=-1).threshold_neg == -1.0
    assert isinstance(FFConfig(threshold_neg=3).threshold_neg, float)
    assert FFLinear(8, 5, loss="scff").config.threshold_neg == 5.0  # the layer width for "sum" goodness
    assert FFLinear(8, 5, loss="scff", goodness="mean").config.threshold_neg == 1.0
    assert FFLinear(8, 5, loss="scff", threshold=2.0).config.threshold_neg == 2.0
    assert FFLinear(8, 5, loss="scff", threshold_neg=7).config.threshold_neg == 7.0
    assert FFConv2d(2, 6, 3, loss="scff", goodness="sum").config.threshold_neg == 6.0
    assert FFConv2d(2, 6, 3, loss="scff", threshold_neg=0.5, scff_lambda=0.1).config.scff_lambda == 0.1
    assert "threshold_neg=7, scff_lambda=0.2" in repr(FFLinear(8, 5, loss="scff", threshold_neg=7, scff_lambda=0.2))
    assert "scff_lambda" not in repr(FFLinear(8, 5))


@pytest.mark.parametrize("kw,msg", [
    (dict(scff_lambda=-0.5), r"scff_lambda must be a finite number >= 0, got -0.5"),
    (dict(scff_lambda=float("nan")), r"scff_lambda must be a finite number >= 0, got nan"),
    (dict(threshold_neg=float("inf")), r"threshold_neg must be finite, got inf"),
    (dict(threshold_neg=float("nan")), r"threshold_neg must be finite, got nan"),
])
@pytest.mark.parametrize("where", ["FFConfig", "FFLinear", "FFConv2d"])
def test_bad_scff_options_are_one_line_value_errors(kw, msg, where):
    make = {"FFConfig": lambda: FFConfig(loss="scff", **kw), "FFLinear": lambda: FFLinear(8, 5, loss="scff", **kw),
            "FFConv2d": lambda: FFConv2d(2, 4, 3, loss="scff", **kw)}[where]
    with pytest.raises(ValueError, match=msg) as e:
        make()
    assert "\n" not in str(e.value)


def test_the_options_strings_carry_both_keys_and_round_trip():
    cfg = FFConfig(loss="scff", threshold=2.0, threshold_neg=3.25, scff_lambda=0.1 + 0.2, goodness="mean")
    for text, keys, conv in ((cfg.op_options, OP_OPTION_KEYS, False), (cfg.conv_op_options, CONV_OPTION_KEYS, True)):
        assert [item.split("=")[0] for item in text.split(";")] == list(keys)
        assert "threshold=2.0;threshold_neg=3.25;loss=scff;" in text
        assert f"scff_lambda={0.1 + 0.2!r};" in text  # repr: the exact float crosses
        assert FFConfig.from_op_options(text, conv=conv) == cfg
    for other in (FFConfig(), FFConfig(loss="symba"), FFConfig(loss="competitive", goodness_over="group")):
        assert FFConfig.from_op_options(other.conv_op_options, conv=True) == other  # every loss carries the keys
    loc = cfg.replace(goodness_over="location", goodness_power=1)
    assert FFConfig.from_op_options(loc.conv_op_options, conv=True) == loc


@pytest.mark.parametrize("backend", backend_params((CPU,)))
def test_the_compiled_parser_reads_both_keys(backend):
    """The C++ parser takes threshold_neg and scff_lambda from the string (not defaults): an op call with the keys
    changed by hand computes the loss of the changed options."""
    gen = torch.Generator().manual_seed(7)
    xp, xn = (x.float() for x in _pairs(gen, 5, 6))
    w = torch.randn(4, 6, generator=gen)
    base = FFConfig(loss="scff", threshold=3.0, threshold_neg=3.0)
    changed = base.replace(threshold_neg=4.5, scff_lambda=0.25)
    text = base.op_options.replace("threshold_neg=3.0", "threshold_neg=4.5").replace("scff_lambda=0.0",
                                                                                       "scff_lambda=0.25")
    assert text == changed.op_options
    got = backend.op("ff_grad")(xp, xn, w, None, None, text)[0]
    assert torch.equal(got, torch.ops.ffkernels.ff_grad(xp, xn, w, None, None, changed.op_options)[0])
    assert not torch.equal(got, torch.ops.ffkernels.ff_grad(xp, xn, w, None, None, base.op_options)[0])
    torch.testing.assert_close(got, oracle.ff_grad(xp, xn, w, None, changed).loss)


# ---- ffkernels train -------------------------------------------------------------------------------------------------

def _train_args(*argv):
    import argparse

    from ffkernels.cli_options import HelpFormatter
    from ffkernels.train_cli import add_arguments

    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_arguments(p)
    return p, p.parse_args(list(argv))


def test_train_flags_build_scff_layers_and_are_refused_with_other_losses():
    from ffkernels.cli_options import check_scff_options
    from ffkernels.train_common import build_net, model_dict, resolve_recipe

    p, args = _train_args("--loss", "scff", "--threshold-neg", "3", "--scff-lambda", "0.05", "--hidden", "12", "8",
                          "--device", "cpu")
    check_scff_options(args, "train")
    resolve_recipe(args)
    net = build_net(args, 20, 10)
    assert [(l.config.loss, l.config.threshold, l.config.threshold_neg, l.config.scff_lambda) for l in net.layers] == \
        [("scff", 12.0, 3.0, 0.05), ("scff", 8.0, 3.0, 0.05)]
    assert model_dict(args) == {"hidden": [12, 8], "loss": "scff", "threshold_neg": 3.0, "scff_lambda": 0.05}
    _, plain = _train_args("--loss", "scff", "--hidden", "12", "--device", "cpu")
    resolve_recipe(plain)
    assert build_net(plain, 20, 10).layers[0].config.threshold_neg == 12.0  # None: the resolved threshold
    help_text = " ".join(p.format_help().split())
    assert "--threshold-neg" in help_text and "(default: --threshold)" in help_text
    assert f"(default: {FFConfig().scff_lambda})" in help_text
    for argv in (("--scff-lambda", "0.1"), ("--loss", "symba", "--threshold-neg", "2")):
        _, bad = _train_args(*argv)
        with pytest.raises(SystemExit, match="apply to --loss scff only") as e:
            check_scff_options(bad, "train")
        assert "\n" not in str(e.value)

