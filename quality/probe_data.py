"""Labelled prompt sets for sparse probing: reading them, turning their targets into 0/1 labels,
and splitting them into seeded, balanced train and test halves.

Two sources:
- the binary datasets of the `sae-probes` benchmark (Kantamneni et al. 2025), read from the data
  files of its installed wheel (`pip install --no-deps sae-probes`: its own dependencies,
  TransformerLens and xgboost among them, are not needed). routesae never imports its code: the
  files are found with `importlib.util.find_spec` and decompressed with numcodecs' zstd (already
  a dependency of zarr). The binary ones are the rows of `probing_datasets_MASTER.csv.zst` whose
  "Data type" is "Binary Classification" (113 files). A dataset is named by its file stem
  (`5_hist_fig_ismale`) or by that stem without its number (`hist_fig_ismale`).
- any user file, `.csv` (or `.csv.zst`) with columns `prompt` and `target`, or `.jsonl` with
  those two fields per line.

Targets become 0/1 as the benchmark's LabelEncoder does it: the distinct values sorted (as numbers
where every value is one, else as text), the first is 0 and the second 1 (`female` 0, `male` 1;
`False` 0, `True` 1). A file with one class is refused. A file with more than two classes is
probed one-vs-rest on its most frequent class (1 = that class, 0 = every other; ties go to the
first in sorted order); the label names record which.

Splits follow the benchmark's normal setting: a training split of min(N - 100, 1024) prompts and
the rest as test, both half positive (a dataset of fewer than 200 prompts keeps N // 2 for test
instead of 100, so tiny files still split). Both splits are drawn with a generator seeded by the
seed and the dataset's name, so a dataset splits the same way whatever other datasets are read
with it, and every SAE is probed on the same prompts.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import zlib
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from routesae.errors import RouteSAEError

PACKAGE = "sae_probes"
INSTALL_HINT = "pip install --no-deps sae-probes"
MASTER = "probing_datasets_MASTER.csv.zst"
BINARY_TYPE = "Binary Classification"
MAX_TRAIN = 1024
"""The benchmark's largest training split."""
MIN_TEST = 100
"""Prompts the benchmark keeps for test at least."""
DEFAULT_SEED = 42
"""The benchmark's split seed."""


class ProbeDataset(NamedTuple):
    """One labelled prompt set, its targets already 0/1."""

    name: str
    """The sae-probes file stem, or a user file's stem."""
    source: str
    """Where it was read from."""
    prompts: list[str]
    labels: np.ndarray
    """[n] int8, 0 or 1."""
    classes: tuple[str, str]
    """The target values behind 0 and 1 ('rest' for 0 when the file was one-vs-rest)."""
    one_vs_rest: bool
    """True where the file had more than two classes."""


class Split(NamedTuple):
    """Row indices of a dataset's balanced training and test splits."""

    train: np.ndarray
    test: np.ndarray


def sae_probes_data() -> Path:
    """The data folder of the installed sae-probes wheel, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RouteSAEError(f"the sae-probes datasets are not installed; run: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (folder / MASTER).is_file():
        raise RouteSAEError(f"{folder} holds no {MASTER}; reinstall with: {INSTALL_HINT}")
    return folder


def decompress_zstd(data: bytes, path: Path) -> bytes:
    from numcodecs.zstd import Zstd

    try:
        return bytes(Zstd().decode(data))
    except Exception as e:  # numcodecs raises RuntimeError with zstd's own message
        raise RouteSAEError(f"{path} is not a readable zstd file ({e})") from None


def read_text(path: Path) -> str:
    """A text file, decompressed when its name ends in .zst."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RouteSAEError(f"cannot read {path}: {e.strerror or e}") from None
    if path.name.endswith(".zst"):
        raw = decompress_zstd(raw, path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RouteSAEError(f"{path} is not UTF-8 text") from None


def read_records(path: Path) -> list[dict[str, object]]:
    """The rows of a .csv / .csv.zst (header line) or .jsonl file, as dicts."""
    text = read_text(path)
    stem = path.name.removesuffix(".zst")
    if stem.endswith(".jsonl"):
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RouteSAEError(f"{path} line {i} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise RouteSAEError(f"{path} line {i} is not a JSON object")
            rows.append(row)
        return rows
    if stem.endswith(".csv"):
        csv.field_size_limit(1 << 30)  # a few datasets hold whole articles in one field
        return list(csv.DictReader(io.StringIO(text, newline="")))
    raise RouteSAEError(f"{path}: a probing dataset is a .csv, .csv.zst or .jsonl file of prompt, target")


def binary_names() -> list[str]:
    """The 113 binary sae-probes datasets, in the master list's order (file stems)."""
    folder = sae_probes_data()
    names = []
    for row in read_records(folder / MASTER):
        if (row.get("Data type") or "").strip() == BINARY_TYPE:
            saved = (row.get("Dataset save name") or "").strip()
            names.append(Path(saved).name.removesuffix(".csv"))
    return names


def _resolve_name(spec: str) -> Path:
    """A sae-probes dataset name (with or without its number) -> its file."""
    folder = sae_probes_data() / "cleaned_data"
    exact = folder / f"{spec}.csv.zst"
    if exact.is_file():
        return exact
    matches = sorted(p for p in folder.glob("*.csv.zst") if p.name.removesuffix(".csv.zst").split("_", 1)[-1] == spec)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise RouteSAEError(f"dataset {spec!r} is ambiguous: {', '.join(p.name for p in matches)}")
    raise RouteSAEError(f"no sae-probes dataset {spec!r} (and no such file); `routesae probe-data --list` names them")


def _sort_key(values: list[str]):
    try:
        [float(v) for v in values]
    except ValueError:
        return str
    return float


def binarize(targets: list[str], where: str) -> tuple[np.ndarray, tuple[str, str], bool]:
    """Targets -> (0/1 labels, the values behind 0 and 1, one_vs_rest); see the module docstring."""
    counts = Counter(targets)
    if len(counts) < 2:
        only = next(iter(counts), "nothing")
        raise RouteSAEError(f"{where} has one class ({only!r}): probing needs two")
    ordered = sorted(counts, key=_sort_key(list(counts)))
    if len(counts) == 2:
        labels = np.array([ordered.index(t) for t in targets], dtype=np.int8)
        return labels, (ordered[0], ordered[1]), False
    top = max(ordered, key=lambda v: counts[v])  # max keeps the first of equal counts: sorted order
    return np.array([t == top for t in targets], dtype=np.int8), ("rest", top), True


def load_dataset(spec: str) -> ProbeDataset:
    """A sae-probes dataset by name, or a user .csv / .csv.zst / .jsonl file."""
    path = Path(spec).expanduser()
    if not path.is_file():
        if any(ch in spec for ch in "/\\") or spec.endswith((".csv", ".jsonl", ".zst")):
            raise RouteSAEError(f"no such dataset file: {spec}")
        path = _resolve_name(spec)
    rows = read_records(path)
    if not rows:
        raise RouteSAEError(f"{path} holds no rows")
    missing = [c for c in ("prompt", "target") if c not in rows[0]]
    if missing:
        raise RouteSAEError(f"{path} has no {' or '.join(repr(c) for c in missing)} column "
                            f"(a probing dataset needs prompt and target; it has {', '.join(map(repr, rows[0]))})")
    prompts, targets = [], []
    for row in rows:
        prompt, target = row.get("prompt"), row.get("target")
        if prompt is None or target is None or str(target).strip() == "":
            continue  # a ragged or empty row: the benchmark's files have none
        prompts.append(str(prompt))
        targets.append(str(target).strip())
    if not prompts:
        raise RouteSAEError(f"{path} holds no row with both a prompt and a target")
    labels, classes, one_vs_rest = binarize(targets, str(path))
    name = path.name.removesuffix(".zst").rsplit(".", 1)[0]
    return ProbeDataset(name, str(path), prompts, labels, classes, one_vs_rest)


def split(labels: np.ndarray, name: str, seed: int = DEFAULT_SEED, max_train: int | None = None,
          max_test: int | None = None) -> Split:
    """Balanced train and test rows (module docstring), each capped by max_train / max_test (the
    presets' smaller samples); train rows first positive-and-negative shuffled together."""
    n = len(labels)
    reserve = MIN_TEST if n >= 2 * MIN_TEST else n // 2
    n_train = min(n - reserve, MAX_TRAIN, max_train if max_train is not None else MAX_TRAIN)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    minority = min(len(pos), len(neg))
    # per class: half the training split, at least one row left for test
    half = min(n_train // 2, minority - 1)
    if half < 1:
        raise RouteSAEError(f"dataset {name} has too few prompts of one class to split ({len(pos)} positive, "
                            f"{len(neg)} negative)")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    pos, neg = rng.permutation(pos), rng.permutation(neg)
    test_half = minority - half
    if max_test is not None:
        test_half = min(test_half, max(max_test // 2, 1))
    train = rng.permutation(np.concatenate([pos[:half], neg[:half]]))
    test = rng.permutation(np.concatenate([pos[half:half + test_half], neg[half:half + test_half]]))
    return Split(train, test)


class Preset(NamedTuple):
    """A named choice of datasets and sample sizes."""

    datasets: tuple[str, ...] | None
    """sae-probes dataset names; None: every binary one."""
    max_train: int | None
    max_test: int | None


PRESETS = {
    # Eight datasets of short prompts (names, places, headlines, sentences, reviews, SMS: 16 to 115
    # characters on average, about 15 SmolLM2 tokens with BOS) over as many kinds of feature (gender,
    # nationality, country, topic, a bigram, grammaticality, spam, sentiment), at 512 train + 256
    # test prompts each: 6,144 prompts, about 92k tokens. The long-prompt sets (wikidata_*: ~470
    # characters, agnews: ~2,300) are left out, as their tokens would cost the most.
    # Measured (probe-data, SmolLM2 float32, 2 datasets x 192 prompts, batches of 32): 32-41
    # tokens/s, but on a machine loaded 6 deep on its 2 cores, where a plain 1 x 512 forward ran at
    # 55 tokens/s against the 412 the README measured unloaded; batches of short prompts ran at the
    # same rate as the 512-token one (49 against 55 tokens/s), so unloaded the harvest takes about
    # 92k / ~370 tokens/s, 4-5 minutes. Probing (10 C values per fit) ran 190 s for 2 SAEs x 2 small
    # datasets on that loaded machine; scaled the same way, about 10 s per single-layer SAE over
    # the 8 datasets, a minute for the dense baselines of 16 layers (shared), a few minutes for an
    # MLSAE (one probe per layer): some 12-15 minutes for the harvest and five SAEs.
    "cpu": Preset(("5_hist_fig_ismale", "6_hist_fig_isamerican", "21_headline_istrump",
                   "123_world_country_United_Kingdom", "65_high-school", "87_glue_cola", "96_spam_is",
                   "113_movie_sent"), 512, 256),
    # The benchmark's normal setting: every binary dataset, train min(N - 100, 1024), the rest test.
    "full": Preset(None, None, None),
}
