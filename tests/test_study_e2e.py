"""End to end: a tiny study through the CLI (all files, their structure), resume, refusal, the demo wiring."""
import json
import os
import shutil

import pytest
import torch

from ffkernels import available_backends
from ffkernels.cli import main
from ffkernels.data import load_dataset
from ffkernels.study import demo
from ffkernels.study.config import StudyConfig
from ffkernels.study.algos import make_trainer
from ffkernels.study.pretext import get_pretext
from ffkernels.study.store import StudyFolderError, StudyStore

TINY = ["--dataset", "digits", "--pretext", "supervised", "jigsaw", "--algo", "both", "--hidden", "16", "16",
        "--epochs", "2", "--batch-size", "50", "--max-train", "200", "--max-test", "100", "--probe-steps", "10",
        "--knn-k", "3", "--tsne-points", "40", "--threads", "1", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


def study(out, *extra):
    main(["study", *TINY, "--out", str(out), *extra])
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, study(out)


def test_tiny_study_writes_every_file_with_the_right_structure(finished, capsys):
    out, res = finished
    assert res["format"] == "ffkernels-study" and res["config"]["hidden"] == [16, 16]
    assert res["fingerprint"] == StudyConfig.from_dict(res["config"]).fingerprint()
    rows = res["rows"]
    assert sorted((r["pretext"], r["algo"]) for r in rows) == [("jigsaw", "bp"), ("jigsaw", "ff"),
                                                               ("supervised", "bp"), ("supervised", "ff")]
    for r in rows:
        assert r["dataset"] == "digits" and r["seed"] == 0 and r["n_train"] == 200 and r["n_test"] == 100
        assert r["pretext_classes"] == (24 if r["pretext"] == "jigsaw" else 10)
        assert 0.0 <= r["pretext_accuracy"] <= 1.0 and len(r["transfer"]["layers"]) == 2
        assert r["best_transfer"] == max(r["transfer"]["layers"] + [r["transfer"]["all"]])
        assert r["best_transfer_layer"] in (1, 2, "all")
        assert all(len(r["cluster"][m]) == 2 for m in ("knn_accuracy", "silhouette"))
        assert r["samples_per_s"] > 0 and r["wall_seconds"] >= r["train_seconds"] > 0
        if r["algo"] == "bp":
            assert r["backend"] == "torch-autograd"
        else:
            assert r["backend"] in available_backends()
        assert r["curves"]["epoch"] == r["curves"]["eval_epoch"] == [1, 2] and len(r["curves"]["pretext_accuracy"]) == 2
        assert r["pretext_accuracy"] == r["curves"]["pretext_accuracy"][-1]
        assert len(r["curves"]["loss"][0]) == (2 if r["algo"] == "ff" else 1)  # FF: a loss per layer
        assert r["config"] == res["config"]
    base = res["baselines"]["digits"]
    assert set(base) == {"pixels", "untrained"} and len(base["untrained"]["transfer"]["layers"]) == 2
    report = (out / "report.md").read_text()
    assert "| pretext | FF pretext acc % | BP pretext acc % | FF best transfer % |" in report
    assert "| supervised |" in report and "| jigsaw |" in report and "Silhouette per layer" in report
    for name in ("transfer_digits.png", "curves_digits.png", "tsne_digits_supervised.png", "tsne_digits_jigsaw.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"({name})" in report
    assert len(list((out / "embeddings").iterdir())) == 4


def test_tiny_study_probes_read_the_right_labels(finished):
    """The probe pairs features with their own labels: on digits (10 classes, chance 0.1) the pixel probe and every
    row's best transfer are far above chance, even after 2 epochs. Measured (seed 0, this config, cpu backend):
    pixels 0.92, untrained net 0.69, FF 0.82 (supervised) / 0.83 (jigsaw), BP 0.69 / 0.69. A probe fitted on
    shuffled or misaligned labels scores ~0.1."""
    _, res = finished
    assert res["baselines"]["digits"]["pixels"]["best_transfer"] >= 0.7
    assert res["baselines"]["digits"]["untrained"]["best_transfer"] >= 0.4
    for r in res["rows"]:
        assert r["best_transfer"] >= 0.45, (r["pretext"], r["algo"], r["best_transfer"])


LEARN = ["--dataset", "digits", "--pretext", "supervised", "--algo", "both", "--hidden", "64", "--epochs", "5",
         "--batch-size", "50", "--max-train", "1000", "--max-test", "300", "--probe-steps", "20", "--knn-k", "3",
         "--tsne-points", "0", "--threads", "1", "--no-progress"]


def test_both_algorithms_learn_digits(tmp_path):
    """The harness can learn: 5 epochs of the supervised pretext on 1000 digits, one hidden layer of 64 (so FF
    predicts from the layer it trains). Measured (seed 0, cpu backend): pretext accuracy FF 0.087 after epoch 1 ->
    0.843 after 5, BP 0.583 -> 0.903; transfer FF 0.943, BP 0.950; pixel probe 0.973. The bars sit well below those
    and far above chance (0.1): a harness that trains or scores against the wrong labels fails them.
    (With two hidden layers FF predicts from the second, which on this setting ranks the true label last: 0.007.)"""
    main(["study", *LEARN, "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["baselines"]["digits"]["pixels"]["best_transfer"] >= 0.8
    rows = {r["algo"]: r for r in res["rows"]}
    assert set(rows) == {"ff", "bp"}
    for algo, r in rows.items():
        curve = r["curves"]["pretext_accuracy"]
        assert r["pretext_accuracy"] >= 0.6, (algo, curve)
        assert curve[-1] >= curve[0] + 0.15, (algo, curve)  # it improves with training
        assert r["best_transfer"] >= 0.7, (algo, r["best_transfer"])


def test_rerun_resumes_and_skips_finished_rows(finished, tmp_path, capsys):
    out, res = tmp_path / "copy", finished[1]
    shutil.copytree(finished[0], out)
    again = study(out)
    assert again["rows"] == res["rows"]  # nothing retrained: wall times and all numbers identical
    assert "4 already finished there (skipped)" in capsys.readouterr().out
    more = study(out, "--seeds", "2")  # one more seed: only its 4 rows are trained
    assert more["rows"][:4] == res["rows"] and sorted(r["seed"] for r in more["rows"][4:]) == [1, 1, 1, 1]


def test_other_config_in_the_folder_is_refused_then_overwritten_on_request(tmp_path):
    out = tmp_path / "s"
    first = study(out, "--pretext", "flip")
    with pytest.raises(SystemExit, match=r"another config .*epochs: 2 -> 1.*--overwrite"):
        study(out, "--pretext", "flip", "--epochs", "1")
    assert json.loads((out / "results.json").read_text()) == first  # left as it was
    (out / "notes.txt").write_text("mine")
    second = study(out, "--pretext", "flip", "--epochs", "1", "--overwrite")
    assert second["config"]["epochs"] == 1 and len(second["rows"]) == 2
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only the study's own files


def test_folders_of_one_config_merge_and_another_config_is_refused(finished, tmp_path, capsys):
    seed0, res0 = finished
    seed1 = study(tmp_path / "s1", "--first-seed", "1", "--pretext", "jigsaw")   # run elsewhere / side by side
    merged = tmp_path / "m"
    main(["study", "--merge", str(seed0), str(tmp_path / "s1"), "--out", str(merged)])
    res = json.loads((merged / "results.json").read_text())
    assert res["fingerprint"] == res0["fingerprint"] and res["rows"] == res0["rows"] + seed1["rows"]
    assert res["baselines"] == res0["baselines"]                          # the first folder's reference points
    out = capsys.readouterr().out
    assert "4 runs added" in out and "2 runs added" in out
    report = (merged / "report.md").read_text()
    assert next(line for line in report.splitlines() if line.startswith("| jigsaw |")).count(" ± ") >= 4
    assert "| supervised |" in report and " ± " not in next(
        line for line in report.splitlines() if line.startswith("| supervised |"))
    tsne = StudyStore.open(str(merged)).load_embedding("digits", "jigsaw", "ff")
    assert tsne[0] == 0 and len(list((merged / "embeddings").iterdir())) == 4   # the folder's first t-SNE kept
    main(["study", "--merge", str(tmp_path / "s1"), "--out", str(merged)])
    assert "0 runs added" in capsys.readouterr().out and json.loads((merged / "results.json").read_text()) == res
    StudyStore(str(tmp_path / "other"), StudyConfig(epochs=1))
    with pytest.raises(SystemExit, match="cannot merge .*another config.*epochs"):
        main(["study", "--merge", str(tmp_path / "other"), "--out", str(merged)])


def test_non_empty_folder_without_results_is_refused(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"x")
    with pytest.raises(StudyFolderError, match="not empty .*--overwrite"):
        StudyStore(str(tmp_path), StudyConfig())
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(StudyFolderError, match="not an ffkernels study"):
        StudyStore(str(tmp_path), StudyConfig())


@pytest.mark.parametrize("algo", ["bp", "bp-goodness-last", "bp-goodness-all"])
def test_every_algorithm_of_one_seed_starts_from_ffs_weights(algo):
    ds = load_dataset("digits")
    cfg = StudyConfig(hidden=(12, 7))
    trainers = []
    for a in ("ff", algo):
        torch.manual_seed(3)
        trainers.append(make_trainer(a, [ds.in_features, *cfg.hidden], get_pretext("rotation"), 4, cfg, "cpu", "auto"))
    ff, other = trainers
    assert (other.net.head is not None and other.net.head.out_features == 4) == (algo == "bp")
    for a, b in zip(ff.net.layers, other.net.layers):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_demo_prints_the_ff_vs_bp_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_DATASET", "digits")
    monkeypatch.setattr(demo, "DEMO_CONFIG", StudyConfig(hidden=(8,), epochs=1, probe_steps=5, knn_k=3, tsne_points=0,
                                                         max_train=100, max_test=50))
    main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--threads", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert "| supervised |" in out and "| rotation |" in out and "FF samples/s | BP samples/s" in out
    assert "wall time" in out and (tmp_path / "demo" / "report.md").exists()
