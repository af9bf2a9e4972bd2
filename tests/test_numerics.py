"""Pinned CPU numerics: a few steps of the demo's pretraining give the same bits whichever code paths the
processor would choose, and pinning refuses to run after the paths are chosen.

Each run is a fresh process (tests/numerics_fingerprint.py), because the libraries choose their code
paths at the first tensor operation. Another processor is emulated by asking the libraries for other
paths through their environment variables: the ones pinned (MKL_CBWR, ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA) and the thread count.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmv.data.phantom import PhantomSettings, write_phantom_dataset
from mmv.numerics import PINNED_ENVIRONMENT, pin_cpu_numerics

REPOSITORY = Path(__file__).resolve().parent.parent
FINGERPRINT = Path(__file__).resolve().parent / "numerics_fingerprint.py"
# Paths another processor takes by itself: Intel's MKL kernels, PyTorch's and oneDNN's widest code.
OTHER_PROCESSOR = {"MKL_CBWR": "AVX512", "ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}
# Paths a processor without AVX-512 takes: these differ from an AVX-512 processor's own choice here.
NARROWER_PROCESSOR = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _clean_environment(extra: dict[str, str]) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in PINNED_ENVIRONMENT}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    return {**environment, **extra}


def _fingerprint(phantoms: Path, out: Path, *options: str, environment: dict[str, str]) -> dict[str, str]:
    completed = subprocess.run(
        [sys.executable, str(FINGERPRINT), str(phantoms), str(out), *options],
        env=_clean_environment(environment), capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(directory, 8, 0, PhantomSettings(ct_spacing=(10.0,) * 3, xray_spacing=5.0), progress=False)
    return directory


def test_pinned_pretraining_features_and_probe_do_not_follow_the_processors_code_paths(phantoms, tmp_path):
    own = _fingerprint(phantoms, tmp_path / "own", "--pin", environment={})
    other = _fingerprint(phantoms, tmp_path / "other", "--pin", environment=OTHER_PROCESSOR)
    narrower = _fingerprint(phantoms, tmp_path / "narrower", "--pin", environment=NARROWER_PROCESSOR)
    assert own["capability"] == other["capability"] == narrower["capability"] == "AVX2"
    assert own == other == narrower


@pytest.mark.skipif(not _has_avx512(), reason="needs a processor whose own paths are wider than AVX2")
def test_without_pinning_the_code_paths_change_the_bits(phantoms, tmp_path):
    # What the pinned test guards against: the paths a processor chooses change every result.
    own = _fingerprint(phantoms, tmp_path / "own", environment={})
    narrower = _fingerprint(phantoms, tmp_path / "narrower", environment=NARROWER_PROCESSOR)
    for result in ("weights", "features", "probe"):
        assert own[result] != narrower[result], result


def test_pinning_refuses_once_a_tensor_operation_chose_the_paths():
    # The first operation runs PyTorch's plainest path (asked for by its variable), which pinning cannot undo.
    script = "import torch; torch.ones(64).sum(); from mmv.numerics import pin_cpu_numerics; pin_cpu_numerics()"
    completed = subprocess.run(
        [sys.executable, "-c", script], env=_clean_environment({"ATEN_CPU_CAPABILITY": "default"}),
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode != 0
    assert "RuntimeError: pin_cpu_numerics: PyTorch's CPU kernels run the DEFAULT path" in completed.stderr


def test_a_refused_pin_leaves_the_environment_as_it_was():
    script = (
        "import os, torch; torch.ones(64).sum(); from mmv.numerics import pin_cpu_numerics\n"
        "try:\n    pin_cpu_numerics()\nexcept RuntimeError:\n    pass\n"
        "print(os.environ.get('MKL_CBWR'), os.environ.get('ONEDNN_MAX_CPU_ISA'), os.environ['ATEN_CPU_CAPABILITY'])\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], env=_clean_environment({"ATEN_CPU_CAPABILITY": "default"}),
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["None", "None", "default"]


def test_pinning_again_is_harmless_and_sets_the_environment():
    # This process has run tensor operations already, so it passes only where they ran on the pinned path.
    script = (
        "import os; from mmv.numerics import pin_cpu_numerics, PINNED_ENVIRONMENT\n"
        "first = pin_cpu_numerics(); import torch; torch.ones(64).sum(); second = pin_cpu_numerics()\n"
        "assert first == second == PINNED_ENVIRONMENT\n"
        "assert all(os.environ[k] == v for k, v in PINNED_ENVIRONMENT.items())\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], env=_clean_environment({}), capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
