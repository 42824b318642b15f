"""scripts/gpu_check.py runs (here on the CPU, with a tiny config) and reports every number it promises."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_a_tiny_config_and_reports_an_exact_float32_patch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OUT": str(tmp_path)}
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--tiny", "--skip-pytest"]
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=ROOT)
    report = json.loads((tmp_path / "gpu_check.json").read_text())["llama"]
    assert report["float32"]["top1_agreement"] == 1.0 and report["float32"]["max_abs_logit_diff"] <= 1e-4
    assert report["bfloat16"]["baseline_max_abs_logit_diff"] > 0 and report["patch_seconds_per_forward"] > 0
    assert report["float32"]["generation_agreement"] == 1.0 and report["bfloat16"]["patched_to_plain"] > 0
