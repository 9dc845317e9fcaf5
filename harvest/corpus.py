"""Document sources: a Hugging Face dataset (streamed), local files, or a built-in corpus.

Every source is an iterator of strings in a fixed order, so a harvest can skip the documents
it already committed and continue exactly where it stopped.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from routesae.errors import RouteSAEError

BUILTIN_NAMES = ("builtin", "pydoc")
LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
# The paper's corpus; streamed from the hub.


def builtin_documents() -> Iterator[str]:
    """Real English text that ships with CPython: the pydoc topic pages (~110k tokens), then the
    docstrings of the standard library's modules, classes and functions (read with `ast`,
    nothing imported; a few hundred thousand tokens more)."""
    yield from pydoc_topics()
    yield from stdlib_docstrings()


def pydoc_topics() -> Iterator[str]:
    """The pydoc topic pages, in name order (`--dataset builtin:topics`)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def stdlib_docstrings() -> Iterator[str]:
    """The standard library's docstrings of 200 characters or more (`--dataset builtin:docstrings`):
    text the start of `builtin` does not hold, for an evaluation store of other text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in ("test", "idlelib", "site-packages", "lib2to3") or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    yield doc


def _field(record: dict, text_field: str, where: str) -> str:
    if text_field not in record:
        raise RouteSAEError(f"{where}: records have no field {text_field!r} (fields: {sorted(record)[:8]}); use --text-field")
    return record[text_field]


def _jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    raise RouteSAEError(f"{path}:{n}: not valid JSON") from None
                yield _field(record, text_field, str(path)) if isinstance(record, dict) else str(record)


def _json(path: Path, text_field: str) -> Iterator[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise RouteSAEError(f"{path}: not valid JSON") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if not lists:
            raise RouteSAEError(f"{path}: expected a list of records or an object holding one")
        data = lists[0]
    for record in data:
        yield _field(record, text_field, str(path)) if isinstance(record, dict) else str(record)


def _txt(path: Path) -> Iterator[str]:
    """A text file holds documents separated by blank lines."""
    para: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                para.append(line)
            elif para:
                yield "".join(para).strip()
                para = []
    if para:
        yield "".join(para).strip()


def _parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise RouteSAEError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names[:8]}); use --text-field")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def _local_documents(path: Path, text_field: str) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file()) if path.is_dir() else [path]
    if not files:
        raise RouteSAEError(f"{path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl(f, text_field)
        elif f.suffix == ".json":
            yield from _json(f, text_field)
        elif f.suffix == ".parquet":
            yield from _parquet(f, text_field)
        else:
            yield from _txt(f)


def _hub_documents(dataset_id: str, split: str, text_field: str) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
    except Exception as e:  # datasets raises many types for a missing id, split or script
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RouteSAEError(f"cannot stream dataset {dataset_id!r} split {split!r}: {first}") from None
    for record in stream:
        yield _field(record, text_field, dataset_id)


def document_source(dataset: str, split: str = "train", text_field: str = "text") -> Callable[[], Iterator[str]]:
    """Check that the dataset exists and return a function that starts its documents from the top.

    Checking here, before the model loads, makes a bad --dataset fail in a second."""
    if dataset.lower() in BUILTIN_NAMES:
        return builtin_documents
    if dataset.lower() in BUILTIN_PARTS:
        return BUILTIN_PARTS[dataset.lower()]
    path = Path(dataset).expanduser()
    if path.exists():
        if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
            raise RouteSAEError(f"{path}: unsupported file type; use {'/'.join(LOCAL_SUFFIXES)}")
        return lambda: _local_documents(path, text_field)
    if dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith((".", "/", "~")):
        raise RouteSAEError(f"no such dataset file or folder: {dataset}")
    from routesae.model.loading import hub_reachable

    if not hub_reachable():
        raise RouteSAEError(
            f"cannot stream dataset {dataset!r}: the Hugging Face hub is unreachable; "
            "pass a local .jsonl/.json/.txt/.parquet file or folder, or --dataset builtin"
        )
    return lambda: _hub_documents(dataset, split, text_field)


def shuffled(docs: Iterator[str], seed: int, buffer: int) -> Iterator[str]:
    """Deterministic buffered shuffle of a document stream (buffer 0: keep the order)."""
    if buffer <= 1:
        yield from docs
        return
    rng = random.Random(seed)
    pool: list[str] = []
    for doc in docs:
        if len(pool) < buffer:
            pool.append(doc)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = doc
    rng.shuffle(pool)
    yield from pool


BUILTIN_PARTS: dict[str, Callable[[], Iterator[str]]] = {"builtin:topics": pydoc_topics,
                                                          "builtin:docstrings": stdlib_docstrings}
"""The two halves of the built-in corpus on their own."""
