"""The GPU check (one run, meant to take under 5 minutes on one GPU; never timed there): the device-placement
tests on CUDA, then a randomly initialised ~1B-parameter Llama built from a config there: exact patch in
float32 and bfloat16 (top-1 agreement and max |logit diff| against the model with its context, and without
any patch), cached patched generation in both (agreement with the context, cost per token against HF's
cached `generate`, and bfloat16's own floor as scripts/bf16_real_model.py takes it), and the patch's cost
against one context-ful forward. Prints one JSON object (also $OUT/gpu_check.json where OUT is set).

    PYTHONPATH=src python scripts/gpu_check.py [--tiny] [--skip-pytest]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from implicit_icl.cli.patch import plain_seconds_per_token
from implicit_icl.hf import compute_patch, patched_generate, verify_patch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bf16_real_model import floor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from timing import llama_style, median_seconds  # noqa: E402

# layers, width, MLP width, heads, key/value heads (benchmarks/timing.llama_style)
SIZES = {"1b": (16, 2048, 8192, 32, 8), "tiny": (2, 64, 128, 4, 2)}
NEW_TOKENS, GENERATION_SEED = 32, 11


def seconds(function, device: torch.device) -> float:
    """Median wall time of `function()` (benchmarks/timing.py), synchronised on CUDA so kernels are counted."""

    def synchronised() -> None:
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return median_seconds(synchronised, repeats=5, warmup=1)


def llama_check(size: str, device: torch.device, prompts: int = 4) -> dict:
    model = llama_style(*SIZES[size], vocab=32000, positions=1024).to(device)
    models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    result = {"parameters": sum(p.numel() for p in model.parameters())}
    for name, checked in models.items():
        rows = []
        for seed in range(prompts):
            ids = random_ids(257, seed)
            patch = compute_patch(checked, ids[:-1], ids[-1:], dtype=torch.float32)
            rows.append(verify_patch(checked, ids[:-1], ids[-1:], patch))
        result[name] = {
            "top1_agreement": sum(r.top1_match for r in rows) / len(rows),
            "max_abs_logit_diff": max(r.max_abs_logit_diff for r in rows),
            "baseline_max_abs_logit_diff": max(r.baseline_max_abs_logit_diff for r in rows),
            **generation_check(checked),
        }
    # bf16's own floor (docs/results/bf16.md): the model with its context in bfloat16 against float32.
    forced, free = floor(models.pop("bfloat16"), model, random_ids(257, GENERATION_SEED).to(device), NEW_TOKENS)
    result["bfloat16"].update(floor_teacher_forced=forced, floor_free_running=free)
    ids = random_ids(513, 9).to(device)
    with torch.no_grad():
        forward = seconds(lambda: model(ids[None]), device)
    patch_seconds = seconds(lambda: compute_patch(model, ids[:-1], ids[-1:], dtype=torch.float32), device)
    result["patch_seconds_per_forward"] = patch_seconds / forward
    result["forward_seconds_512_tokens"] = forward
    return result


def random_ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 32000, (length,), generator=torch.Generator().manual_seed(seed))


def generation_check(model) -> dict:
    """Greedy NEW_TOKENS after a random 257-token prompt: the cached patched path (each token alone under its
    exact patch) against the model with the context, and its cost per token against HF's cached generate."""
    ids = random_ids(257, GENERATION_SEED)
    generation = patched_generate(model, ids[:-1], ids[-1:], NEW_TOKENS)
    plain = plain_seconds_per_token(model, ids, NEW_TOKENS)
    return {
        "generation_agreement": generation.agreement,
        "generation_teacher_forced_agreement": generation.teacher_forced_agreement,
        "seconds_per_token_patched": generation.seconds_per_token_patched,
        "seconds_per_token_plain": plain,
        "patched_to_plain": generation.seconds_per_token_patched / plain,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny config: checks that the script runs")
    parser.add_argument("--skip-pytest", action="store_true", help="leave out the device-placement tests")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if not args.skip_pytest:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_device.py"],
            capture_output=True,
            text=True,
        )
        report["device_tests"] = {"returncode": run.returncode, "tail": run.stdout.strip().splitlines()[-1:]}
    try:
        report["llama"] = llama_check("tiny" if args.tiny else "1b", device)
    except Exception as error:  # recorded, not raised: the rest of the report still comes back
        report["llama"] = {"error": f"{type(error).__name__}: {error}"}
    text = json.dumps(report, indent=1)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as file:
            file.write(text)


if __name__ == "__main__":
    main()
