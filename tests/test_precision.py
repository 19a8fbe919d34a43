"""``"amp": "auto"``: the resolution rule per device class (capabilities mocked), explicit values,
and what a run writes (banner, config.json, metrics.jsonl, checkpoint)."""
from __future__ import annotations

import json

import pytest
import torch

from utils import amp
from utils.amp import Precision, amp_dtype, check_amp, cpu_bf16_support, resolve_precision
from utils.errors import ConfigError


def _cpu(monkeypatch, *, amx=False, avx512_bf16=False, capability="AVX512", onednn_bf16=True):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16, raising=False)


def _gpu(monkeypatch, major: int, minor: int = 0, name: str = "Test GPU"):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_cpu_with_amx_resolves_to_bf16(monkeypatch):
    _cpu(monkeypatch, amx=True, avx512_bf16=True)
    precision = resolve_precision("auto", "cpu")
    assert precision.amp == "bf16" and precision.warning is None
    assert precision.describe() == "precision: bf16 (auto: this CPU has native bf16 (AMX))"


def test_cpu_with_avx512_bf16_resolves_to_bf16(monkeypatch):
    _cpu(monkeypatch, avx512_bf16=True)
    assert resolve_precision("auto", "cpu").amp == "bf16"
    assert cpu_bf16_support().detail == "AVX512-BF16"


def test_avx2_only_cpu_resolves_to_fp32(monkeypatch):
    _cpu(monkeypatch, capability="AVX2", onednn_bf16=False)
    precision = resolve_precision("auto", "cpu")
    assert precision.amp is False and precision.name == "fp32"
    assert precision.describe() == "precision: fp32 (auto: this CPU has no native bf16 (no AMX, no AVX512-BF16))"


@pytest.mark.parametrize("capability, onednn, why", [("AVX2", True, "ATEN_CPU_CAPABILITY"),
                                                      ("AVX512", False, "ONEDNN_MAX_CPU_ISA")])
def test_native_hardware_limited_by_torch_dispatch_resolves_to_fp32(monkeypatch, capability, onednn, why):
    """The emulation of an AVX2 machine on a bf16 one (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)."""
    _cpu(monkeypatch, amx=True, avx512_bf16=True, capability=capability, onednn_bf16=onednn)
    precision = resolve_precision("auto", "cpu")
    assert precision.amp is False and why in precision.reason


def test_explicit_bf16_on_a_cpu_without_native_bf16_runs_with_a_warning(monkeypatch):
    _cpu(monkeypatch, capability="AVX2", onednn_bf16=False)
    precision = resolve_precision("bf16", "cpu")
    assert precision.amp == "bf16" and precision.reason == "as configured"
    assert "slower than fp32" in precision.warning and amp.NON_NATIVE_BF16_SLOWDOWN in precision.warning
    _cpu(monkeypatch, amx=True, avx512_bf16=True)
    assert resolve_precision("bf16", "cpu").warning is None
    assert resolve_precision(False, "cpu") == Precision(False, False, "as configured")


@pytest.mark.parametrize("major, expected", [(9, "bf16"), (8, "bf16"), (7, "fp16"), (6, "fp16")])
def test_cuda_auto_by_compute_capability(monkeypatch, major, expected):
    _gpu(monkeypatch, major, name="GPU-X")
    precision = resolve_precision("auto", torch.device("cuda", 0))
    assert precision.amp == expected
    assert f"GPU-X, compute capability {major}.0" in precision.reason
    if expected == "fp16":
        assert "gradient scaler" in precision.reason
    assert amp_dtype(precision.amp) == {"bf16": torch.bfloat16, "fp16": torch.float16}[expected]


def test_values_checked_and_auto_must_be_resolved_before_use():
    for value in ("auto", "bf16", "fp16", False, "fp32", "bfloat16"):
        check_amp(value)
    with pytest.raises(ConfigError, match="amp: unknown value 'int8'"):
        check_amp("int8")
    with pytest.raises(ValueError, match="resolved"):
        amp_dtype("auto")
    assert Precision(False, "auto", "r").record() == {"amp": "fp32", "requested": "auto", "reason": "r"}


def test_a_run_records_the_resolved_precision(tmp_path, monkeypatch, trained_tiny):
    """Banner, config.json ("resolved"), metrics.jsonl and the checkpoint name what auto chose."""
    run = trained_tiny.run_dir
    expected = resolve_precision("auto", "cpu")
    config = json.loads((run / "config.json").read_text())
    assert config["trainer"]["amp"] == "auto"
    assert {k: config["resolved"][k] for k in ("amp", "requested", "reason")} == expected.record()
    assert expected.describe() in (run / "train.log").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and {r["precision"] for r in records} == {expected.name}
    checkpoint = torch.load(trained_tiny.checkpoint, weights_only=True)
    assert checkpoint["precision"] == expected.record()


def test_resume_on_another_machine_says_the_precision_changed():
    from trainer.session import _precision_notes
    here = Precision(False, "auto", "auto: this CPU has no native bf16 (no AMX, no AVX512-BF16)")
    there = {"amp": "bf16", "requested": "auto", "reason": "auto: this CPU has native bf16 (AMX)"}
    notes = _precision_notes(here, {"precision": there}, test_only=False)
    assert len(notes) == 1 and "the checkpoint was trained in bf16 (auto: this CPU has native bf16 (AMX))" in notes[0]
    assert "continues in fp32 and is not bit-exact" in notes[0]
    assert _precision_notes(here, {"precision": {**there, "amp": "fp32"}}, test_only=False) == []   # same machine
    assert _precision_notes(here, {"precision": there}, test_only=True) == []
    slow = Precision("bf16", "bf16", "as configured", "amp bf16 on a CPU without native bf16 ... slower than fp32")
    assert _precision_notes(slow, None, test_only=False) == [f"warning: {slow.warning}"]
