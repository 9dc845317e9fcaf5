"""routesae.atomic_files: a write that fails leaves the old file (or nothing) and no temp file."""

from __future__ import annotations

import json
import os

import pytest

from routesae.atomic_files import (
    atomic_directory,
    atomic_open,
    atomic_write,
    is_temp_name,
    save_figure,
    temp_name,
    write_json,
    write_text,
)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if is_temp_name(p.name))


def test_writes_replace_whole_files(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"x": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": "é"}
    write_text(path, "second")
    assert path.read_text() == "second" and _leftovers(path.parent) == []


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    write_text(path, "old")

    def half(tmp):
        tmp.write_text("half of the new")
        raise OSError("disk gone")

    with pytest.raises(OSError):
        atomic_write(path, half)
    assert path.read_text() == "old" and _leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path) as f:
            f.write("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_atomic_open_appears_only_when_done(tmp_path):
    path = tmp_path / "lines.jsonl"
    with atomic_open(path) as f:
        f.write("1\n")
        assert not path.exists()  # readers see nothing until the block ends
        assert is_temp_name(os.path.basename(f.name))
    assert path.read_text() == "1\n"
    with pytest.raises(ValueError):
        with atomic_open(path, "a"):
            pass


def test_temp_names_differ_by_thread(tmp_path):
    import threading

    names = []
    t = threading.Thread(target=lambda: names.append(temp_name(tmp_path / "x")))
    t.start()
    t.join()
    assert names[0] != temp_name(tmp_path / "x") and is_temp_name(names[0].name)


def test_atomic_directory(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "w").write_text("x")
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty folder may stand in the way
    with atomic_directory(out) as tmp:
        (tmp / "w").write_text("x")
    assert (out / "w").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and _leftovers(tmp_path) == []
    assert not plt.fignum_exists(fig.number)
