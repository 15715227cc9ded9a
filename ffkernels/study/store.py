"""A study's output folder: ``results.json`` (config, fingerprint, finished rows, baselines), t-SNE maps
under ``embeddings/``, and the rules for reusing a folder.

- A new or empty folder is started.
- A folder whose results.json has the same config fingerprint is resumed: finished rows are kept and skipped.
- A folder with another config, or non-empty without results.json, is refused (StudyFolderError) unless
  ``overwrite``: then only the files a study writes are removed, never anything else.
- Folders of one config (other seeds or tasks, run on other machines or side by side) merge into one
  (``StudyStore.merge``, ``ffkernels study --merge``).
results.json is rewritten atomically after every finished row, so an interrupted study loses at most the
row it was running.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from .config import StudyConfig

RESULTS = "results.json"
REPORT = "report.md"
EMBEDDINGS = "embeddings"
PLOT_PREFIXES = ("tsne_", "transfer_", "curves_")
FORMAT = "ffkernels-study"


class StudyFolderError(RuntimeError):
    """The output folder holds something this study must not silently overwrite."""


def row_key(dataset: str, pretext: str, algo: str, seed: int) -> tuple:
    return (dataset, pretext, algo, int(seed))


def _key_of(row: dict) -> tuple:
    return row_key(row["dataset"], row["pretext"], row["algo"], row["seed"])


def _owned(name: str) -> bool:
    """Files and folders a study writes (and may remove on --overwrite)."""
    return name in (RESULTS, REPORT, EMBEDDINGS) or (name.endswith(".png") and name.startswith(PLOT_PREFIXES))


class StudyStore:
    def __init__(self, out: str, config: StudyConfig, overwrite: bool = False):
        self.out = os.fspath(out)
        self.config = config
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, RESULTS)
        entries = sorted(os.listdir(self.out))
        if os.path.exists(path):
            saved = self._read(path)
            if saved["fingerprint"] == config.fingerprint():
                self.results = saved
                return
            if not overwrite:
                old = StudyConfig.from_dict(saved["config"])
                diff = "; ".join(old.differences(config)) or "version"
                raise StudyFolderError(
                    f"ffkernels: {self.out!r} holds a study with another config (fingerprint {saved['fingerprint']}, "
                    f"this one {config.fingerprint()}); it differs in: {diff}. "
                    f"Its {len(saved['rows'])} finished rows were left as they are. Choose another --out, rerun "
                    f"with the same settings to resume, or pass --overwrite to discard them.")
            self._clear()
        elif entries and not overwrite:
            raise StudyFolderError(
                f"ffkernels: {self.out!r} is not empty ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}) "
                f"and holds no {RESULTS}; choose an empty or new --out, or pass --overwrite to write the study "
                f"there (other files are kept).")
        elif entries:
            self._clear()
        self.results = {"format": FORMAT, "fingerprint": config.fingerprint(), "config": config.to_dict(),
                        "rows": [], "baselines": {}}
        self.save()

    @classmethod
    def open(cls, out: str) -> "StudyStore":
        """The existing study in ``out``, with the config its results.json was made with (nothing is removed)."""
        path = os.path.join(os.fspath(out), RESULTS)
        if not os.path.exists(path):
            raise StudyFolderError(f"ffkernels: {os.fspath(out)!r} holds no {RESULTS}: nothing to report")
        saved = cls._read(path)
        config = StudyConfig.from_dict(saved["config"])
        if config.fingerprint() != saved["fingerprint"]:
            raise StudyFolderError(f"ffkernels: {path} was written by another version of the study (its config does "
                                   f"not give its fingerprint {saved['fingerprint']}); rerun it with this version")
        return cls(out, config)

    @staticmethod
    def _read(path: str) -> dict:
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise StudyFolderError(f"ffkernels: cannot read {path}: {e}; move it away or pass --overwrite") from e
        if not isinstance(saved, dict) or saved.get("format") != FORMAT or "fingerprint" not in saved:
            raise StudyFolderError(f"ffkernels: {path} is not an ffkernels study's results file; choose another --out "
                                   f"or pass --overwrite")
        return saved

    def _clear(self) -> None:
        for name in os.listdir(self.out):
            if _owned(name):
                full = os.path.join(self.out, name)
                shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)

    # ---- rows and baselines ------------------------------------------------------------------------

    @property
    def rows(self) -> list:
        return self.results["rows"]

    def has(self, key: tuple) -> bool:
        return any(_key_of(r) == key for r in self.rows)

    def add_row(self, row: dict) -> None:
        if self.has(_key_of(row)):
            raise ValueError(f"ffkernels: row {_key_of(row)} is already in {self.out}")
        self.rows.append(row)
        self.save()

    def merge(self, other: "StudyStore") -> tuple:
        """Add what ``other`` (a study folder with the same fingerprint: other seeds or tasks, run elsewhere or at
        the same time) holds and this one lacks: its rows, its baselines of other datasets, its t-SNE maps. Rows
        this folder already has are kept as they are. Returns (rows added, rows already here)."""
        if other.results["fingerprint"] != self.results["fingerprint"]:
            diff = "; ".join(self.config.differences(other.config)) or "version"
            raise StudyFolderError(f"ffkernels: cannot merge {other.out!r} into {self.out!r}: another config "
                                   f"(fingerprint {other.results['fingerprint']}, here {self.results['fingerprint']}); "
                                   f"it differs in: {diff}")
        new = [r for r in other.rows if not self.has(_key_of(r))]
        self.rows.extend(new)
        for dataset, baseline in other.results["baselines"].items():
            self.results["baselines"].setdefault(dataset, baseline)
        src = os.path.join(other.out, EMBEDDINGS)
        for name in sorted(os.listdir(src)) if os.path.isdir(src) else []:
            mine = os.path.join(self.out, EMBEDDINGS, name)
            if not os.path.exists(mine):
                os.makedirs(os.path.dirname(mine), exist_ok=True)
                shutil.copy2(os.path.join(src, name), mine)
        self.save()
        return len(new), len(other.rows) - len(new)

    def baseline(self, dataset: str):
        return self.results["baselines"].get(dataset)

    def set_baseline(self, dataset: str, baseline: dict) -> None:
        self.results["baselines"][dataset] = baseline
        self.save()

    def save(self) -> None:
        """Write results.json atomically (a temporary file renamed over it)."""
        tmp = os.path.join(self.out, f".{RESULTS}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
        os.replace(tmp, os.path.join(self.out, RESULTS))

    # ---- t-SNE maps --------------------------------------------------------------------------------

    def embedding_path(self, dataset: str, pretext: str, algo: str) -> str:
        return os.path.join(self.out, EMBEDDINGS, f"{dataset}__{pretext}__{algo}.npz")

    def has_embedding(self, dataset: str, pretext: str, algo: str) -> bool:
        return os.path.exists(self.embedding_path(dataset, pretext, algo))

    def save_embedding(self, dataset: str, pretext: str, algo: str, seed: int, coords: list, labels) -> None:
        """The t-SNE coordinates (one (n, 2) array per layer) of one run and the classes of its points."""
        path = self.embedding_path(dataset, pretext, algo)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez_compressed(path, seed=seed, labels=np.asarray(labels), coords=np.stack(coords))

    def load_embedding(self, dataset: str, pretext: str, algo: str):
        """(seed, labels (n,), coords (layers, n, 2)) or None."""
        path = self.embedding_path(dataset, pretext, algo)
        if not os.path.exists(path):
            return None
        with np.load(path) as z:
            return int(z["seed"]), z["labels"], z["coords"]
