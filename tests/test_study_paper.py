"""The paper's setting in the study: the preset, the Adam probe, the BP-goodness ablation, hybrid negatives, and
the side-by-side table."""
import json

import pytest
import torch

from ffkernels.backends import reference as ref
from ffkernels.cli import main
from ffkernels.labels import embed_label
from ffkernels.study import cli as study_cli
from ffkernels.study.algos import ALGO_GROUPS, ALGOS, make_trainer, runs_on
from ffkernels.study.config import StudyConfig
from ffkernels.study.paper import PAPER_PRESET, PAPER_REPORTED_MNIST
from ffkernels.study.pretext import get_pretext, hybrid_masks, make_hybrid_data, partners
from ffkernels.study.probe import fit_adam_probe, fit_adam_probes
from ffkernels.study import doc_blocks
from ffkernels.study.claims import claims_table
from ffkernels.study.tables import mean_std
from ffkernels.study.report import paper_settings_table, paper_table, probe_table, wall_table
from ffkernels.training import train_ff_epoch

from test_probe_metrics import blobs


# ---- hybrid negatives -------------------------------------------------------------------------------

def test_hybrid_masks_are_smooth_binary_regions():
    m = hybrid_masks(64, 28, 28, 6, torch.Generator().manual_seed(0))
    assert m.shape == (64, 1, 28, 28) and set(m.unique().tolist()) == {0.0, 1.0}
    assert 0.3 < float(m.mean()) < 0.7
    same_h = float((m[..., 1:] == m[..., :-1]).float().mean())
    same_v = float((m[..., 1:, :] == m[..., :-1, :]).float().mean())
    raw = torch.randint(0, 2, (64, 1, 28, 28), generator=torch.Generator().manual_seed(0)).float()
    assert same_h > 0.8 and same_v > 0.8 and float((raw[..., 1:] == raw[..., :-1]).float().mean()) < 0.6
    with pytest.raises(ValueError, match="blur_steps >= 1"):
        hybrid_masks(2, 4, 4, 0, torch.Generator())


def test_hybrid_images_take_every_pixel_from_the_image_or_another_one():
    g = torch.Generator().manual_seed(1)
    assert all(bool((partners(n, g) != torch.arange(n)).all()) for n in (2, 3, 50))
    with pytest.raises(ValueError, match="at least 2 images"):
        partners(1, g)
    x = torch.rand(30, 2 * 8 * 8)
    same, hyb = make_hybrid_data(x, (2, 8, 8), 2, torch.Generator().manual_seed(2))
    assert same is x and hyb.shape == x.shape
    g = torch.Generator().manual_seed(2)  # the same draws again: the masks, then the partners
    m = hybrid_masks(30, 8, 8, 2, g)
    j = partners(30, g)
    img = x.reshape(30, 2, 8, 8)
    assert torch.equal(hyb.reshape(30, 2, 8, 8), m * img + (1 - m) * img[j])
    from_self = (hyb.reshape(30, 2, 8, 8) == img)
    assert bool((from_self | (hyb.reshape(30, 2, 8, 8) == img[j])).all()) and 0 < float(from_self.float().mean()) < 1


# ---- the paper's probe --------------------------------------------------------------------------------

def test_adam_probes_side_by_side_are_each_the_probe_trained_alone():
    x, y = blobs(40, num_classes=3, dim=12, seed=0)
    xs = [x[:, :5], x, x * 3]
    together = fit_adam_probes(xs, y, 3, 3, 1e-2, 16, seed=7)
    for a, b in zip(together, [fit_adam_probe(t, y, 3, 3, 1e-2, 16, seed=7) for t in xs]):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    x_te, y_te = blobs(30, num_classes=3, dim=12, seed=1)
    assert fit_adam_probe(x, y, 3, 30, 1e-2, 16, seed=0).accuracy(x_te, y_te) > 0.95
    assert not torch.equal(together[1].weight, fit_adam_probe(x, y, 3, 3, 1e-2, 16, seed=8).weight)


def test_adam_probe_bad_input():
    x, y = blobs(10)
    with pytest.raises(ValueError, match="epochs >= 1"):
        fit_adam_probe(x, y, 3, 0, 1e-3, 10, 0)
    with pytest.raises(ValueError, match=r"features \(n, d\) and n labels"):
        fit_adam_probes([x, x[:5]], y, 3, 1, 1e-3, 10, 0)
    with pytest.raises(ValueError, match="probe labels must lie"):
        fit_adam_probe(x, y + 5, 3, 1, 1e-3, 10, 0)


# ---- the BP-goodness ablation -------------------------------------------------------------------------

def _trainer(algo, task="rotation", hidden=(12, 9, 7), num_labels=4, seed=0, **cfg):
    torch.manual_seed(seed)
    return make_trainer(algo, [64, *hidden], get_pretext(task), num_labels, StudyConfig(hidden=hidden, **cfg),
                        "cpu", "auto")


@pytest.mark.parametrize("where,layers", [("last", [2]), ("all", [0, 1, 2])])
def test_goodness_bp_loss_is_ffs_loss_at_its_layers_and_trains_end_to_end(where, layers):
    t = _trainer(f"bp-goodness-{where}", threshold=None)
    assert t.loss_layers == layers
    g = torch.Generator().manual_seed(0)
    xp, xn = torch.rand(10, 64, generator=g), torch.rand(10, 64, generator=g)
    losses = t.losses(xp, xn)
    h_pos, h_neg = t.net.features(xp), t.net.features(xn)
    for got, i in zip(losses, layers):
        cfg = t.layer_cfgs[i]
        assert cfg.threshold == [12, 9, 7][i]  # FFLinear's rule: the width for "sum" goodness
        want = ref.ff_loss(ref.goodness(h_pos[i], "sum"), ref.goodness(h_neg[i], "sum"), cfg)
        torch.testing.assert_close(got, want)
    losses.sum().backward()
    assert float(t.net.layers[0].weight.grad.abs().sum()) > 0  # the first layer learns from the last one's loss


def test_goodness_bp_draws_the_same_batches_and_negatives_as_ff():
    """FF and the ablation see the same data stream: after an epoch from the same generator state, both leave
    it in the same state (a permutation, then one wrong-label draw per batch)."""
    x, y = torch.rand(57, 64), torch.randint(0, 4, (57,))
    states = []
    for algo in ("ff", "bp-goodness-all"):
        t = _trainer(algo, batch_size=10)
        g = torch.Generator().manual_seed(5)
        if algo == "ff":
            train_ff_epoch(t.net, x, y, 4, 10, g)
        else:
            t.epoch((x, y), g)
        states.append(g.get_state())
    assert torch.equal(*states)


def test_goodness_bp_predicts_by_the_goodness_of_each_label():
    t = _trainer("bp-goodness-all")
    x = torch.rand(6, 64)
    scores = t.scores(x)
    for c in range(4):
        h = t.net.features(embed_label(x, torch.full((6,), c), 4))
        torch.testing.assert_close(scores[:, c], sum(ref.goodness(h[i], "sum") for i in (1, 2)))
    assert _trainer("bp-goodness-last").predict_layers == [2]
    acc = t.pretext_accuracy((x, scores.argmax(1)))
    assert acc == 1.0


def test_only_ff_trains_on_hybrid_images():
    hybrid = get_pretext("hybrid")
    assert [a for a in ALGOS if runs_on(a, hybrid)] == ["ff"]
    assert all(runs_on(a, get_pretext("rotation")) for a in ALGOS)
    with pytest.raises(ValueError, match="no counterpart on the hybrid task"):
        _trainer("bp", task="hybrid")
    assert ALGO_GROUPS == {"both": ("ff", "bp"), "all": tuple(ALGOS)}


# ---- the preset, the CLI and the tables ---------------------------------------------------------------

def test_preset_paper_sets_the_defaults_and_explicit_flags_win(monkeypatch):
    seen = []
    monkeypatch.setattr(study_cli, "run", seen.append)
    main(["study", "--preset", "paper", "--epochs", "3", "--pretext", "flip"])
    main(["study", "--epochs", "3"])
    paper, plain = seen
    assert paper.epochs == 3 and paper.pretext == ["flip"]  # explicit
    assert paper.hidden == [2000] * 4 and paper.lr == paper.bp_lr == 1e-4 and paper.probe == "both"
    assert paper.algo == "all" and paper.seeds == 2 and paper.eval_every == 10
    assert {k: getattr(paper, k) for k in PAPER_PRESET if k not in ("epochs", "pretext")} == \
        {k: v for k, v in PAPER_PRESET.items() if k not in ("epochs", "pretext")}
    assert plain.probe == "lbfgs" and plain.algo == "both" and plain.lr == StudyConfig().ff_lr
    cfg = study_cli.config_from_args(paper)
    assert cfg.probes == ("lbfgs", "paper") and cfg.hidden == (2000,) * 4
    with pytest.raises(ValueError, match="probes must be distinct"):
        StudyConfig(probes=("lbfgs", "lbfgs"))


def test_tiny_study_with_every_algorithm_hybrid_and_both_probes(tmp_path):
    out = tmp_path / "s"
    main(["study", "--dataset", "digits", "--pretext", "supervised", "rotation", "hybrid", "--algo", "all",
          "--hidden", "16", "16", "--epochs", "2", "--batch-size", "50", "--max-train", "200", "--max-test", "100",
          "--probe", "both", "--paper-probe-epochs", "2", "--paper-probe-lr", "0.1", "--probe-steps", "10", "--knn-k",
          "3", "--tsne-points", "0", "--threads", "1", "--no-progress", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    # both probes can read the labels (digits: chance 0.1). Measured (seed 0, cpu backend): pixels lbfgs 0.92, paper
    # probe 0.85 (2 epochs need lr 0.1; at the default 1e-3 it stays at chance); every row's lbfgs probe 0.68-0.88
    pixels = res["baselines"]["digits"]["pixels"]["probes"]
    assert pixels["lbfgs"]["best"] >= 0.7 and pixels["paper"]["best"] >= 0.5, pixels
    assert all(r["probes"]["lbfgs"]["best"] >= 0.45 for r in rows), [r["probes"]["lbfgs"]["best"] for r in rows]
    assert sorted((r["pretext"], r["algo"]) for r in rows) == sorted(
        [(p, a) for p in ("supervised", "rotation") for a in ALGOS] + [("hybrid", "ff")])
    for r in rows:
        assert set(r["probes"]) == {"lbfgs", "paper"}
        assert r["transfer"]["layers"] == r["probes"]["lbfgs"]["layers"]  # the first probe is the primary one
        assert r["best_transfer"] == max(r["probes"]["lbfgs"]["layers"] + [r["probes"]["lbfgs"]["all"]])
        for p in r["probes"].values():
            assert p["best"] == max(p["layers"] + [p["all"]]) and all(0 <= a <= 1 for a in p["layers"])
        assert len(r["curves"]["loss"][0]) == {"ff": 2, "bp": 1, "bp-goodness-last": 1, "bp-goodness-all": 2}[r["algo"]]
    hybrid = next(r for r in rows if r["pretext"] == "hybrid")
    assert hybrid["features_input"].startswith("plain input") and 0 <= hybrid["pretext_accuracy"] <= 1
    assert set(res["baselines"]["digits"]["pixels"]["probes"]) == {"lbfgs", "paper"}
    report = (out / "report.md").read_text()
    assert "### Transfer by probe (%)" in report and "| hybrid | FF |" in report
    assert "BP-G all best transfer %" in report

    table = paper_table(rows, "digits").splitlines()
    sup_ff = next(line for line in table if line.startswith("| supervised | FF |"))
    r = next(r for r in rows if (r["pretext"], r["algo"]) == ("supervised", "ff"))
    assert f"| {PAPER_REPORTED_MNIST[('supervised', 'ff')]:.1f} |" in sup_ff
    assert f"| {100 * r['probes']['paper']['layers'][-1]:.1f} |" in sup_ff
    assert any(line.startswith("| jigsaw | FF | 53.7 |") for line in table)  # reported, not run here: "–" for ours
    assert "lbfgs last layer %" in probe_table(rows, "digits")


def test_report_only_rewrites_the_report_from_results_json(tmp_path, capsys):
    out = tmp_path / "s"
    main(["study", "--dataset", "digits", "--pretext", "flip", "--hidden", "8", "--epochs", "1", "--max-train", "100",
          "--max-test", "50", "--probe-steps", "5", "--knn-k", "3", "--tsne-points", "0", "--threads", "1",
          "--no-progress", "--out", str(out)])
    report = (out / "report.md").read_text()
    (out / "report.md").unlink()
    (out / "transfer_digits.png").unlink()
    before = (out / "results.json").read_text()
    main(["study", "--report-only", "--out", str(out)])
    assert (out / "report.md").read_text() == report and (out / "transfer_digits.png").exists()
    assert (out / "results.json").read_text() == before  # nothing trained, nothing rewritten
    assert "from 2 finished runs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds no results.json"):
        main(["study", "--report-only", "--out", str(tmp_path / "nothing")])


def _fake_row(pretext, algo, seed, last, best, acc, wall=100.0, threads=2):
    probe = {"layers": [best, last], "all": 0.0, "best": best}
    return {"dataset": "d", "pretext": pretext, "algo": algo, "seed": seed, "pretext_accuracy": acc,
            "probes": {"paper": probe, "lbfgs": probe}, "wall_seconds": wall, "train_seconds": wall / 2,
            "threads": threads, "backend": "cpu", "device": "cpu"}


def test_claims_are_differences_paired_by_seed_next_to_the_papers():
    rows = [_fake_row("rotation", "ff", 0, 0.90, 0.95, 0.90), _fake_row("rotation", "ff", 1, 0.92, 0.95, 0.94),
            _fake_row("rotation", "bp", 0, 0.80, 0.94, 0.98), _fake_row("rotation", "bp", 1, 0.80, 0.96, 0.98),
            _fake_row("rotation", "ff", 2, 0.10, 0.10, 0.10)]       # seed 2 has no BP partner: not paired
    untrained = {"probes": {p: {"layers": [0.93, 0.91], "all": 0.9, "best": 0.93} for p in ("paper", "lbfgs")}}
    table = claims_table(rows, {"untrained": untrained}, "d").splitlines()
    gap = next(line for line in table if "FF rotation − BP rotation" in line).split(" | ")
    # paper 76.3 - 97.5; pretext acc (-8, -4); last layer (+10, +12); best (+1, -1); 2 pairs
    assert gap[2:] == ["-21.2", "-6.0 ± 2.8", "+11.0 ± 1.4", "+0.0 ± 1.4", "+11.0 ± 1.4", "+0.0 ± 1.4", "2 |"]
    vs_none = next(line for line in table if "BP rotation − untrained net" in line).split(" | ")
    assert vs_none[2:] == ["–", "–", "-11.0 ± 0.0", "+2.0 ± 1.4", "-11.0 ± 0.0", "+2.0 ± 1.4", "2 |"]
    ff_none = next(line for line in table if "FF rotation − untrained net" in line)
    assert ff_none.endswith("| 3 |")                            # every FF seed against the one reference
    assert any("BP-G all rotation − BP-G last rotation | -12.0 | – |" in line for line in table)  # reported only
    assert not any("FF supervised − untrained" in line for line in table)   # neither side has it: no row


def test_mean_std_formats_means_spreads_and_signs():
    assert mean_std([0.931, 0.935]) == "93.3 ± 0.3"
    assert mean_std([0.5], percent=False, digits=2) == "0.50"
    assert mean_std([None, None]) == "–"
    assert mean_std([0.012], signed=True) == "+1.2"
    assert mean_std([-0.0004, -0.0003], signed=True) == "+0.0 ± 0.0"    # rounds to zero: no "-0.0"
    assert mean_std([-0.0004]) == "0.0"


def test_wall_table_lists_every_run_per_seed():
    rows = [_fake_row("flip", "ff", 0, 0.9, 0.9, 0.9, wall=600.4, threads=1),
            _fake_row("flip", "ff", 1, 0.9, 0.9, 0.9, wall=580.0), _fake_row("flip", "bp", 1, 0.9, 0.9, 0.9)]
    table = wall_table(rows, "d").splitlines()
    assert table[0] == "| pretext | algo | seed 0: wall s | seed 1: wall s |"
    assert table[2] == "| flip | FF | 600 (300 training, 1 thread) | 580 (290 training, 2 threads) |"
    assert table[3] == "| flip | BP | – | 100 (50 training, 2 threads) |"


def test_doc_blocks_are_rewritten_from_their_source_and_unknown_ones_refused():
    res = {"rows": [], "baselines": {}}
    text = "a\n<!-- generated: paper-settings (note) -->\nstale\n<!-- end generated: paper-settings -->\nb\n"
    new = doc_blocks.refresh(text, res)
    assert new == ("a\n<!-- generated: paper-settings (note) -->\n" + paper_settings_table()
                   + "\n<!-- end generated: paper-settings -->\nb\n")
    assert doc_blocks.refresh(new, res) == new and doc_blocks.block_names(new) == ["paper-settings"]
    with pytest.raises(KeyError, match="'nope' has no generator"):
        doc_blocks.refresh("<!-- generated: nope -->\n<!-- end generated: nope -->", res)
    with pytest.raises(KeyError, match="needs the 'fmnist' results"):
        doc_blocks.refresh("<!-- generated: fmnist-table -->\n<!-- end generated: fmnist-table -->", res)


def test_docs_show_the_generated_settings_and_the_kept_results():
    """docs/study.md's settings, side-by-side, claims, reference and wall-time blocks are generated, never typed:
    from the preset and from docs/study-paper/results.json (the kept run). Stale: python -m
    ffkernels.study.doc_blocks."""
    import os

    root = os.path.join(os.path.dirname(__file__), "..")
    doc = open(os.path.join(root, "docs", "study.md")).read()
    for path, _ in doc_blocks.SOURCES.values():
        assert os.path.exists(path), f"the kept run's results.json: {path}"
    results = doc_blocks.load_sources({k: path for k, (path, _) in doc_blocks.SOURCES.items()})
    assert sorted(doc_blocks.block_names(doc)) == sorted(doc_blocks.BLOCKS)
    assert doc_blocks.refresh(doc, results) == doc, "stale: run python -m ffkernels.study.doc_blocks"


# ---- docs/study.md's typed text: no measured numbers, and the verdict's words against results.json ----------

def _doc_and_results():
    import os

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "docs", "study.md")) as f:
        doc = f.read()
    with open(os.path.join(root, "docs", "study-paper", "results.json")) as f:
        return doc, json.load(f)


def best(p):
    """A run's best-layer transfer by probe ``p`` (a fraction)."""
    return lambda r: r["probes"][p]["best"]


def last(p):
    """A run's last-layer transfer by probe ``p``."""
    return lambda r: r["probes"][p]["layers"][-1]


def pretext(r):
    return r["pretext_accuracy"]


def test_study_doc_types_no_measured_number():
    """Outside the generated blocks (and code blocks) docs/study.md quotes no measurement: no percentage or
    accuracy with decimals, no mean ± std, no table cell holding a decimal number. (The demo and small-setting
    tables and the verdict's numbers used to be typed; they had no kept results file or now come from blocks.)"""
    import re

    doc, _ = _doc_and_results()
    typed = re.sub(r"<!-- generated: ([\w-]+).*?<!-- end generated: \1 -->", "", doc, flags=re.S)
    typed = re.sub(r"```.*?```", "", typed, flags=re.S)
    measured = re.compile(r"\d+\.\d+\s*%|±\s*\d|\d\s*±|\|\s*[-+−]?\d+\.\d+\s*\||\d+(\.\d+)?\s*(samples/s|s wall)")
    found = [m.group(0) for m in measured.finditer(typed)]
    assert not found, f"typed measurements in docs/study.md (generate them or remove them): {found[:10]}"


def test_the_verdict_reads_what_results_json_says():
    """Each statement of docs/study.md's verdict, which quotes no number, against the kept run: differences in
    points, per seed (A and B paired by seed), for the best layer and the last layer, by both probes."""
    from statistics import mean

    from ffkernels.study.claims import UNTRAINED, _pairs
    from ffkernels.study.tables import grouped

    _, res = _doc_and_results()
    g = grouped(res["rows"])
    untrained = res["baselines"]["mnist5k"]["untrained"]
    ssl = ("rotation", "flip", "jigsaw")
    probes = ("paper", "lbfgs")

    def runs(p, a):
        return g[("mnist5k", p, a)]

    def diffs(a, b, what):  # [A - B per seed] in points; what(run) -> fraction
        pairs = _pairs(runs(*a), untrained if b == UNTRAINED else runs(*b))
        assert len(pairs) == 2, (a, b)
        return [100 * (what(x) - what(y)) for x, y in pairs]

    # pretext parity: level on flip (within the seeds' spread), FF behind on rotation, supervised, jigsaw
    d = diffs(("flip", "ff"), ("flip", "bp"), pretext)
    assert abs(mean(d)) <= max(abs(x - mean(d)) for x in d) + 0.5, d
    for p in ("rotation", "supervised", "jigsaw"):
        assert all(x < -1 for x in diffs((p, "ff"), (p, "bp"), pretext)), p
    # transfer gap: small at the best layer after every self-supervised task, by both probes; the paper's gaps 10+
    for p in ssl:
        assert PAPER_REPORTED_MNIST[(p, "ff")] - PAPER_REPORTED_MNIST[(p, "bp")] <= -10, p
        for pr in probes:
            assert abs(mean(diffs((p, "ff"), (p, "bp"), best(pr)))) <= 1.5, (p, pr)
            assert all(x > 0 for x in diffs((p, "ff"), (p, "bp"), last(pr))), (p, pr)  # FF ahead at the last layer
    consistent = {p: all(x < 0 for pr in probes for x in diffs((p, "ff"), (p, "bp"), best(pr)))
                  for p in ssl + ("supervised",)}
    assert consistent == {"rotation": False, "flip": True, "jigsaw": False, "supervised": True}, consistent
    assert all(mean(diffs(("flip", "ff"), ("flip", "bp"), best(pr))) >= -1.5 for pr in probes)  # "a small one"
    # pretraining helps: no self-supervised pretraining beats the untrained network at the best layer; supervised BP
    # and hybrid FF do, by both probes
    for p in ssl:
        for a in ("ff", "bp"):
            assert all(mean(diffs((p, a), UNTRAINED, best(pr))) <= 0.05 for pr in probes), (p, a)
    for a in (("supervised", "bp"), ("hybrid", "ff")):
        assert all(mean(diffs(a, UNTRAINED, best(pr))) > 0 for pr in probes), a
    assert any(mean(diffs(("supervised", "ff"), UNTRAINED, best(pr))) <= 0 for pr in probes)
    # ablation: BP-G all - BP-G last at the best layer negative on all four tasks by the paper's probe, of mixed sign
    # by ours; ahead at the last layer by ours on three tasks; a couple of points at most; BP-G last ~ BP
    tasks = ("supervised",) + ssl
    ab = {pr: [mean(diffs((p, "bp-goodness-all"), (p, "bp-goodness-last"), best(pr))) for p in tasks]
          for pr in probes}
    assert all(x < 0 for x in ab["paper"]) and min(ab["lbfgs"]) < 0 < max(ab["lbfgs"]), ab
    assert min(ab["paper"] + ab["lbfgs"]) >= -2.5, ab
    assert sum(mean(diffs((p, "bp-goodness-all"), (p, "bp-goodness-last"), last("lbfgs"))) > 0 for p in tasks) == 3
    assert all(abs(mean(diffs((p, "bp-goodness-last"), (p, "bp"), best(pr)))) <= 1.0 for p in tasks for pr in probes)
    # hybrid negatives: the best-transferring network by both probes, above FF supervised and FF rotation, and the
    # only pretraining above the untrained network at the best and the last layer by both probes
    for pr in probes:
        top = max(g, key=lambda k: mean(r["probes"][pr]["best"] for r in g[k]))
        assert top == ("mnist5k", "hybrid", "ff"), (pr, top)
        for b in (("supervised", "ff"), ("rotation", "ff")):
            assert mean(diffs(("hybrid", "ff"), b, best(pr))) > 0, (pr, b)
        for what in (best(pr), last(pr)):
            assert mean(diffs(("hybrid", "ff"), UNTRAINED, what)) > 0, pr
    # the probe: best-layer transfer of every run close between the two probes; the paper's probe reads less at the
    # last layer, most for BP-G all and BP after self-supervised tasks
    gap = {}
    for k, rs in g.items():
        assert abs(mean(100 * (r["probes"]["paper"]["best"] - r["probes"]["lbfgs"]["best"]) for r in rs)) <= 1.5, k
        gap[k] = mean(100 * (r["probes"]["lbfgs"]["layers"][-1] - r["probes"]["paper"]["layers"][-1]) for r in rs)
    worst = max(gap, key=gap.get)
    assert worst[2] == "bp-goodness-all" or (worst[2] == "bp" and worst[1] in ssl), (worst, gap[worst])


def test_the_fashion_mnist_verdict_reads_what_results_json_says():
    """Each statement of docs/study.md's Fashion-MNIST verdict (seeds 0-1 for the rotation FF/BP pair, seed 0 for the
    rest; no numbers in the words) against the kept run docs/study-fashion-mnist/results.json: differences in points
    at the best and the last layer, by both probes, the mean over the seeds both sides have."""
    import os
    from statistics import mean

    from ffkernels.study.claims import UNTRAINED, _pairs
    from ffkernels.study.tables import grouped

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "docs", "study-fashion-mnist", "results.json")) as f:
        res = json.load(f)
    ds = "fashion-mnist"
    g = grouped(res["rows"])
    untrained = res["baselines"][ds]["untrained"]
    probes = ("paper", "lbfgs")

    def diffs(a, b, what):  # [A - B in points per seed both sides have]
        pairs = _pairs(g[(ds, *a)], untrained if b == UNTRAINED else g[(ds, *b)])
        assert pairs, (a, b)
        return [100 * (what(x) - what(y)) for x, y in pairs]

    def diff(a, b, what):  # their mean
        return mean(diffs(a, b, what))

    # what ran: every run with seed 0, the rotation FF/BP pair with seeds 0 and 1
    assert {k[1:]: sorted(r["seed"] for r in rs) for k, rs in g.items() if k[0] == ds} == {
        (p, a): [0, 1] if (p, a) in (("rotation", "ff"), ("rotation", "bp")) else [0]
        for p, a in [("supervised", "ff"), ("supervised", "bp"), ("rotation", "ff"), ("rotation", "bp"),
                     ("rotation", "bp-goodness-last"), ("rotation", "bp-goodness-all"), ("hybrid", "ff"),
                     ("scff", "ff")]}

    # pretext parity: FF's rotation accuracy close to the paper's FF (91.5), BP's above the paper's BP (93.5); FF
    # behind by several points on rotation and far behind on the supervised task
    assert all(abs(100 * r["pretext_accuracy"] - 91.5) <= 2 for r in g[(ds, "rotation", "ff")])
    assert all(100 * r["pretext_accuracy"] > 93.5 for r in g[(ds, "rotation", "bp")])
    assert diff(("rotation", "ff"), ("rotation", "bp"), pretext) < -3
    assert diff(("supervised", "ff"), ("supervised", "bp"), pretext) < -10
    # transfer gap after rotation: within about a point at the best layer on each seed (the mean of opposite signs by
    # the two probes), level or ahead at the last
    assert all(abs(x) <= 2.0 for p in probes for x in diffs(("rotation", "ff"), ("rotation", "bp"), best(p)))
    gaps = [diff(("rotation", "ff"), ("rotation", "bp"), best(p)) for p in probes]
    assert all(abs(x) <= 1.5 for x in gaps) and min(gaps) < 0 < max(gaps), gaps
    assert all(diff(("rotation", "ff"), ("rotation", "bp"), last(p)) >= -0.5 for p in probes)
    assert all(diff(("supervised", "ff"), ("supervised", "bp"), best(p)) < -1 for p in probes)
    # pretraining helps: only supervised BP, by a couple of points; the others within about a point of it
    assert all(diff(("supervised", "bp"), UNTRAINED, best(p)) > 1.5 for p in probes)
    for a in (("rotation", "ff"), ("rotation", "bp"), ("supervised", "ff"), ("scff", "ff")):
        assert all(abs(diff(a, UNTRAINED, best(p))) <= 1.0 for p in probes), a
    fr = [diff(("rotation", "ff"), UNTRAINED, best(p)) for p in ("lbfgs", "paper")]
    assert fr[0] > 0 > fr[1], fr
    # ablation: BP-G last ~ BP after rotation; BP-G all ~ BP-G last too (within about a point, by both probes, at
    # the best and the last layer), far from the paper's -12
    assert all(abs(diff(("rotation", "bp-goodness-last"), ("rotation", "bp"), best(p))) <= 1.0 for p in probes)
    for what in [best(p) for p in probes] + [last(p) for p in probes]:
        assert abs(diff(("rotation", "bp-goodness-all"), ("rotation", "bp-goodness-last"), what)) <= 1.5
    # good negatives: SCFF's best layer level with FF rotation/supervised and BP rotation; its last layer far below
    for b in (("rotation", "ff"), ("supervised", "ff"), ("rotation", "bp")):
        assert all(abs(diff(("scff", "ff"), b, best(p))) <= 1.0 for p in probes), b
    assert all(diff(("scff", "ff"), UNTRAINED, last(p)) < -10 for p in probes)
    assert g[(ds, "scff", "ff")][0]["best_transfer_layer"] == 1
    # hybrid negatives: level with the untrained network, FF supervised/rotation and SCFF; its pretext solved well
    for b in (UNTRAINED, ("supervised", "ff"), ("rotation", "ff"), ("scff", "ff")):
        assert all(abs(diff(("hybrid", "ff"), b, best(p))) <= 1.0 for p in probes), b
    assert g[(ds, "hybrid", "ff")][0]["pretext_accuracy"] > 0.9
