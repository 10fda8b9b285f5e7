"""bench/gpu_report.py's CPU mode: the code paths of the one-command GPU report, at toy sizes (~20 s)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_mode_writes_every_section_with_figures(tmp_path):
    out = tmp_path / "report.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), "--cpu", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    for heading in ("## GPU tests", "## Image encoding", "## Training tokens/s", "## Multimodal step overhead",
                    "## ZeRO-2 and ZeRO-3 through the launchers"):
        assert heading in report, heading
    # the GPU tests are listed from the sources: test_gpu.py's and the other files' CUDA tests
    assert "tests/test_gpu.py::test_deepspeed_launchers_zero2_then_zero3_bf16" in report
    assert "tests/test_llm2clip.py::test_bf16_on_cuda_matches_fp32_on_cpu" in report
    # figures, not placeholders: items/s of both encoding runs, tokens/s of both stages, the step overhead
    assert len(re.findall(r"\| (?:bare forward|image_embed pipeline)[^|]*\| \d+\.\d \|", report)) == 2
    assert re.search(r"\| 1 \| 1 \| \d+ \| \d+ \| \d+ \| \d+ \| \d\.\d\dx \| \d\.\d\d GB \|", report)  # stage 1
    assert re.search(r"\| 2 \| 1 \| \d+ \| \d+ \| \d+ \| \d+ \| \d\.\d\dx \| \d\.\d\d GB \|", report)  # stage 2
    assert re.search(r"\| 1 \| \d+\.\d \| \d+\.\d \| [+-]\d+\.\d% \| \d+ \|", report)
    # the ZeRO-2 launcher trained (a finite loss from its trainer state); the ZeRO-3 one printed its GPU command
    assert re.search(r"\| pretrain\.sh \| script/deepspeed/zero2\.json \| \d+ \| \d+\.\d\d \| \d+\.\d{3} \|", report)
    assert "dry run: names script/deepspeed/zero3.json" in report
