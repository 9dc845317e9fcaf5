"""model/compute_dtype.py: which dtype a command runs the model in, with the CPU's (and GPU's)
capabilities monkeypatched both ways; and model/loading.py's load_store_model applying it."""

from __future__ import annotations

import pytest
import torch
from routesae.errors import RouteSAEError
from routesae.model import compute_dtype as cd
from tiny_models import save_tiny

CPU = torch.device("cpu")


@pytest.fixture
def no_torch_probes(monkeypatch):
    """torch's own CPU probes say nothing is supported: the /proc/cpuinfo flags decide."""
    for names in cd.TORCH_PROBES.values():
        for name in names:
            monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)


@pytest.mark.parametrize("flags, native", [
    ({"avx", "avx2", "fma"}, set()),                                 # an AVX2-only EPYC
    ({"avx2", "avx512f", "avx512_bf16"}, {"bfloat16"}),              # Zen 4, Cooper Lake
    ({"avx512f", "amx_tile", "amx_bf16", "amx_fp16"}, {"bfloat16", "float16"}),  # Granite Rapids
    ({"avx512f", "avx512_fp16"}, {"float16"}),
])
def test_the_cpu_flags_decide_the_native_half_dtypes(monkeypatch, no_torch_probes, flags, native):
    monkeypatch.setattr(cd, "cpu_flags", lambda: frozenset(flags))
    assert cd.native_cpu_dtypes() == native


def test_torchs_probe_counts_too(monkeypatch, no_torch_probes):
    monkeypatch.setattr(cd, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cd.native_cpu_dtypes() == {"bfloat16"}


@pytest.mark.parametrize("native, recorded, want", [
    (set(), "bfloat16", "float32"),            # the 27x case: bf16 emulated -> float32
    ({"bfloat16"}, "bfloat16", "bfloat16"),     # native bf16: keep the recorded dtype
    (set(), "float32", "float32"),
    ({"bfloat16"}, "float32", "float32"),      # auto never lowers precision
    ({"bfloat16"}, "float16", "float32"),      # fp16 not native though bf16 is
    ({"float16"}, "fp16", "float16"),
])
def test_auto_on_a_cpu(monkeypatch, native, recorded, want):
    monkeypatch.setattr(cd, "native_cpu_dtypes", lambda: frozenset(native))
    got = cd.pick_compute_dtype("auto", recorded, CPU)
    assert got.name == want and not got.slow
    if want != cd.canonical(recorded):
        assert got.reason.startswith("this CPU has no native") and f"recorded {cd.canonical(recorded)}" in got.reason


def test_an_explicit_dtype_is_used_as_given_with_a_note_where_slow(monkeypatch):
    monkeypatch.setattr(cd, "native_cpu_dtypes", lambda: frozenset())
    got = cd.pick_compute_dtype("bfloat16", "float32", CPU)
    assert got.name == "bfloat16" and got.slow and "no native bf16" in got.reason
    assert cd.pick_compute_dtype("float32", "bfloat16", CPU) == ("float32", "--dtype float32", False)
    monkeypatch.setattr(cd, "native_cpu_dtypes", lambda: frozenset({"bfloat16"}))
    assert not cd.pick_compute_dtype("bfloat16", "float32", CPU).slow


@pytest.mark.parametrize("bf16, recorded, want", [
    (True, "bfloat16", "bfloat16"), (False, "bfloat16", "float32"), (False, "float16", "float16"),
    (True, "float32", "float32"),
])
def test_auto_on_cuda(monkeypatch, bf16, recorded, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert cd.pick_compute_dtype("auto", recorded, torch.device("cuda")).name == want


def test_other_devices_keep_the_recorded_dtype_and_bad_names_are_one_line():
    assert cd.pick_compute_dtype("auto", "bfloat16", torch.device("mps")).name == "bfloat16"
    with pytest.raises(RouteSAEError, match="unknown dtype 'fp8'"):
        cd.pick_compute_dtype("auto", "fp8", CPU)
    with pytest.raises(RouteSAEError, match="unknown dtype 'int8'"):
        cd.pick_compute_dtype("int8", "bfloat16", CPU)


def test_load_store_model_keeps_the_recorded_dtype_unless_asked(monkeypatch, tmp_path):
    # 'recorded' (the default, for repair and eval's store-started runs) is exact whatever the CPU;
    # 'auto' runs a bf16 store's model in float32 on a CPU without native bf16, in bf16 with it
    from routesae.model.loading import load_model, load_store_model

    model_dir = save_tiny("llama", tmp_path / "model", n_layers=2)
    recorded = load_model(str(model_dir), "bfloat16", "cpu").info
    param_dtype = lambda loaded: next(loaded.model.parameters()).dtype  # noqa: E731
    monkeypatch.setattr(cd, "native_cpu_dtypes", lambda: frozenset())
    exact = load_store_model(tmp_path, recorded, None, "cpu", "test")
    assert param_dtype(exact) == torch.bfloat16 and exact.info["dtype"] == "bfloat16"
    auto = load_store_model(tmp_path, recorded, None, "cpu", "test", dtype="auto")
    assert param_dtype(auto) == torch.float32 and auto.info["dtype"] == "float32"
    monkeypatch.setattr(cd, "native_cpu_dtypes", lambda: frozenset({"bfloat16"}))
    assert param_dtype(load_store_model(tmp_path, recorded, None, "cpu", "test", dtype="auto")) == torch.bfloat16
