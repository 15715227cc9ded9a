"""``ffkernels study``: FF vs BP on self-supervised pretext tasks, transfer by linear probe, report and plots.

    ffkernels study --dataset mnist5k --pretext all --algo both --epochs 20 --seeds 3 --out runs/mnist5k
    ffkernels study --preset paper --out runs/paper      # the paper's setting and ablation (hours on a CPU)

Rerunning into the same --out resumes (finished runs are skipped); a different config there is refused
unless --overwrite. The defaults follow the paper's network (4 x 2000 ReLU): slow on a CPU, use --hidden.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from ..cli_options import (
    HelpFormatter,
    add_ff_loss_options,
    add_precision_option,
    add_run_options,
    peek_option,
    show_progress,
)
from ..config import LOSSES
from ..data import LOADERS, DatasetNotFoundError
from .algos import ALGO_GROUPS, ALGOS
from .config import PROBES, StudyConfig
from .paper import PAPER_PRESET
from .pretext import PRETEXTS
from .report import console_summary
from .runner import run_study
from .store import REPORT, RESULTS, StudyFolderError, StudyStore

DEFAULTS = StudyConfig()
PRESETS = {"paper": PAPER_PRESET}
# --loss: scff needs its per-layer thresholds and lambda, which only the scff pretext sets (StudyConfig.scff_*); as a
# plain --loss it would be hinton under another name
STUDY_LOSSES = tuple(x for x in LOSSES if x != "scff")
PROBE_CHOICES = {**{p: (p,) for p in PROBES}, "both": ("lbfgs", "paper")}


def probes_from_args(value) -> tuple:
    """--probe's names (one string from a preset, or the list given) -> the probes, in order, each once."""
    names = [value] if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(p for name in names for p in PROBE_CHOICES[name]))


def _expand(values, choices, what):
    if "all" in values:
        return list(choices)
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise SystemExit(f"ffkernels study: unknown {what} {', '.join(unknown)}; expected 'all' or "
                         f"{', '.join(choices)}")
    return list(dict.fromkeys(values))


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    add_run_options(p)
    add_precision_option(p)
    p.add_argument("--overwrite", action="store_true",
                   help="discard the results of a study with another config in --out (otherwise refused)")


def add_report_only(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite report.md and the plots of --out from its results.json (e.g. after "
                        "an interrupted study)")
    p.add_argument("--merge", nargs="+", default=None, metavar="FOLDER",
                   help="train nothing: add the runs of these study folders (same settings: other seeds or tasks, "
                        "run elsewhere or side by side) that --out lacks, then rewrite its report and plots")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="start from a named setting (paper: the paper's network, schedule, probes, tasks and "
                        "ablation; see docs/study.md); flags given explicitly override it")
    p.add_argument("--dataset", nargs="+", default=["mnist5k"], metavar="NAME",
                   help=f"one or more of {', '.join(LOADERS)}, or all (mnist5k is embedded: offline)")
    p.add_argument("--pretext", nargs="+", default=["rotation"], metavar="TASK",
                   help=f"one or more of {', '.join(PRETEXTS)}, or all")
    p.add_argument("--algo", default="both", choices=[*ALGOS, *ALGO_GROUPS],
                   help="one algorithm, both (ff + bp) or all (ff, bp and the BP-goodness ablations)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds; tables show mean ± std over them")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+seeds-1")
    p.add_argument("--out", default="ffkernels-study", help="output folder (results.json, report.md, plots)")
    p.add_argument("--data-root", default=None, help="folder of on-disk datasets (default $FFKERNELS_DATA or "
                                                     "~/.cache/ffkernels/data)")
    p.add_argument("--download", action="store_true", help="download missing on-disk datasets with torchvision")
    p.add_argument("--hidden", type=int, nargs="+", default=list(d.hidden), help="layer widths (4 x 2000: the paper's)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="pretext training epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--lr", type=float, default=d.ff_lr, help="FF learning rate, Adam per layer")
    p.add_argument("--bp-lr", type=float, default=d.bp_lr, help="BP learning rate, Adam")
    add_ff_loss_options(p, norm_help="normalization before each layer, FF and BP", losses=STUDY_LOSSES,
                        loss_help="FF loss (SCFF's loss comes with --pretext scff)")
    p.add_argument("--probe", choices=list(PROBE_CHOICES), nargs="+", metavar="PROBE",
                   default=next(k for k, v in PROBE_CHOICES.items() if v == d.probes),
                   help="transfer probes, one or more of: lbfgs (standardized features, L-BFGS), paper (raw features, "
                        "Adam for --paper-probe-epochs), scff (SCFF's read-out: per-sample standardized layers, "
                        "dropout, Adam 50 epochs), both (lbfgs and paper); the first fills the main tables")
    p.add_argument("--probe-steps", type=int, default=d.probe_steps,
                   help="L-BFGS iterations of the linear probe")
    p.add_argument("--probe-weight-decay", type=float, default=d.probe_weight_decay,
                   help="L2 penalty of the linear probe")
    p.add_argument("--paper-probe-epochs", type=int, default=d.paper_probe_epochs,
                   help="epochs of the paper probe (Adam)")
    p.add_argument("--paper-probe-lr", type=float, default=d.paper_probe_lr, help="Adam lr of the paper probe")
    p.add_argument("--hybrid-blur-steps", type=int, default=d.hybrid_blur_steps,
                   help="blurs of the hybrid pretext's random masks")
    p.add_argument("--knn-k", type=int, default=d.knn_k, help="neighbours of the k-NN metric")
    p.add_argument("--tsne-points", type=int, default=d.tsne_points,
                   help="test points per t-SNE map, 0 for none")
    p.add_argument("--max-train", type=int, default=None, help="use at most this many training inputs")
    p.add_argument("--max-test", type=int, default=None, help="use at most this many test inputs")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="pretext test accuracy every N epochs")
    add_device_arguments(p)
    add_report_only(p)


def config_from_args(args) -> StudyConfig:
    try:
        return StudyConfig(hidden=tuple(args.hidden), epochs=args.epochs, batch_size=args.batch_size, ff_lr=args.lr,
                           bp_lr=args.bp_lr, goodness=args.goodness, threshold=args.threshold, loss=args.loss,
                           norm=args.norm, probes=probes_from_args(args.probe), probe_steps=args.probe_steps,
                           probe_weight_decay=args.probe_weight_decay, paper_probe_epochs=args.paper_probe_epochs,
                           paper_probe_lr=args.paper_probe_lr, hybrid_blur_steps=args.hybrid_blur_steps,
                           knn_k=args.knn_k, tsne_points=args.tsne_points, max_train=args.max_train,
                           max_test=args.max_test, eval_every=args.eval_every,
                           precision=getattr(args, "precision", "fp32"))
    except ValueError as e:
        raise SystemExit(f"ffkernels study: {e}") from e


def execute(args, datasets, pretexts, algos, seeds, cfg: StudyConfig):
    """Run the study described by the parsed arguments and print the FF-vs-BP table and the wall time."""
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        store = run_study(args.out, datasets, pretexts, algos, seeds, cfg, device=args.device, backend=args.backend,
                          data_root=getattr(args, "data_root", None), download=getattr(args, "download", False),
                          overwrite=args.overwrite, progress=show_progress(args))
    except StudyFolderError as e:
        raise SystemExit(str(e)) from e
    wall = time.perf_counter() - t0
    print()
    print(console_summary(store))
    print(f"\nwall time {wall:.1f} s ({torch.get_num_threads()} thread(s) on {args.device}); "
          f"wrote {args.out}/{RESULTS}, {args.out}/{REPORT} and the plots")
    return store


def report_only(out: str) -> StudyStore:
    """Rewrite report.md and the plots of the study folder ``out`` from its results.json; print the summary."""
    from .plots import write_plots
    from .report import write_report

    try:
        store = StudyStore.open(out)
    except StudyFolderError as e:
        raise SystemExit(str(e)) from e
    write_report(store)
    write_plots(store)
    print(console_summary(store))
    print(f"\nwrote {out}/{REPORT} and the plots from {len(store.rows)} finished runs in {out}/{RESULTS}")
    return store


def merge(out: str, folders) -> StudyStore:
    """Merge the study folders ``folders`` into ``out`` (started with the first one's config if ``out`` holds no
    study yet), then rewrite its report and plots."""
    try:
        others = [StudyStore.open(f) for f in folders]
        store = StudyStore.open(out) if os.path.exists(os.path.join(out, RESULTS)) \
            else StudyStore(out, others[0].config)
        for other in others:
            added, kept = store.merge(other)
            print(f"{other.out}: {added} runs added to {out}, {kept} already there (kept as they were)")
    except StudyFolderError as e:
        raise SystemExit(str(e)) from e
    return report_only(out)


def run(args):
    if getattr(args, "merge", None):
        return merge(args.out, args.merge)
    if getattr(args, "report_only", False):
        return report_only(args.out)
    if args.seeds < 1:
        raise SystemExit("ffkernels study: --seeds must be >= 1")
    datasets = _expand(args.dataset, list(LOADERS), "dataset")
    pretexts = _expand(args.pretext, list(PRETEXTS), "pretext task")
    algos = list(ALGO_GROUPS.get(args.algo, (args.algo,)))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    try:
        return execute(args, datasets, pretexts, algos, seeds, config_from_args(args))
    except DatasetNotFoundError as e:
        raise SystemExit(str(e)) from e


def preset_defaults(argv) -> dict:
    """The defaults ``--preset NAME`` in ``argv`` stands for ({} without one); set them on the parser before
    parsing, so that flags given explicitly still override them."""
    preset = peek_option(argv, "--preset")
    return dict(PRESETS[preset]) if preset in PRESETS else {}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ffkernels study", description=__doc__,
                                formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(**preset_defaults(argv))
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
