"""The command line starts fast (no torch for --help) and chooses its CPU threads from the cores
the process may use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from routesae.cli import COMMANDS, main
from routesae.cpu_threads import cgroup_cpu_limit, choose_threads, usable_cores
from routesae.errors import RouteSAEError

HEAVY = ("torch", "transformers", "zarr", "matplotlib", "datasets", "openai", "scipy")


def _imported_by(args: list[str]) -> list[str]:
    code = (
        "import sys, json\n"
        f"sys.argv = ['routesae', *{args!r}]\n"
        "from routesae.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(done.stderr.strip().splitlines()[-1])


def test_top_level_help_imports_nothing_heavy():
    assert _imported_by(["--help"]) == []
    assert _imported_by(["--version"]) == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_help_imports_no_torch(name):
    assert _imported_by([name, "--help"]) == [], f"`routesae {name} --help` imports heavy modules"


def test_every_listed_command_loads_with_its_name():
    ctx = main.make_context("routesae", ["--help"], resilient_parsing=True)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name
        assert any(p.name == "threads" for p in command.params)
    assert main.get_command(ctx, "no-such-command") is None
    listing = CliRunner().invoke(main, ["--help"]).output
    assert all(name in listing for name in COMMANDS)


def test_choose_threads(monkeypatch):
    assert choose_threads(3, {}) == (3, "--threads")
    assert choose_threads(None, {"OMP_NUM_THREADS": "4"}).threads is None  # the user's choice stands
    assert choose_threads(None, {}).threads == usable_cores()
    with pytest.raises(RouteSAEError):
        choose_threads(0, {})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr("routesae.cpu_threads.cgroup_cpu_limit", lambda: None)
    assert usable_cores() == 8
    monkeypatch.setattr("routesae.cpu_threads.cgroup_cpu_limit", lambda: 3)
    assert usable_cores() == 3


def test_cgroup_quota(tmp_path):
    f = tmp_path / "cpu.max"
    for text, want in (("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000", 2), ("garbage", None)):
        f.write_text(text)
        assert cgroup_cpu_limit(f) == want
    assert cgroup_cpu_limit(tmp_path / "absent") is None


def test_threads_option_sets_torch_before_the_command_runs(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = CliRunner().invoke(main, ["info", "--threads", "1", str(tmp_path / "absent.zarr")])
        assert result.exit_code == 1  # info's own one-line error: no such store
        assert torch.get_num_threads() == 1
        bad = CliRunner().invoke(main, ["info", "--threads", "0", str(tmp_path / "absent.zarr")])
        assert bad.exit_code == 2 and "--threads" in bad.output
    finally:
        torch.set_num_threads(before)


def test_threads_follow_the_process_affinity():
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and two usable cores")
    code = ("import os, torch\nos.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "from routesae.cpu_threads import apply_threads\napply_threads(None)\nprint(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "1", out.stderr
