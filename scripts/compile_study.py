"""The compile study on the default model (or --model): pilot, comparison, curves (and the editing measurement).

    python scripts/compile_study.py pilot   --out out/compile_pilot
    python scripts/compile_study.py compare --out out/compile_study
    python scripts/compile_study.py curves  --out out/compile_study
    python scripts/compile_study.py editing --out out/compile_editing

Runs are saved as they finish (out/runs/*.json) and skipped when the script is run again. One thread by
default: on a shared 2-core machine two threads per process slow everything down when others compute too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from implicit_icl.models.load import load_model
from implicit_icl.report.pages import markdown
from implicit_icl.studies.compile.methods import DEFAULT, SEARCH_RANKS, CurveSettings, StudySettings
from implicit_icl.studies.compile.study import pilot_table, run_many, write_comparison

PILOT_TASKS = ("copy", "capitalize", "last_item", "adjective_comparative")  # kept out of the comparison
TASKS = (
    "country_continent",
    "city_country",
    "element_symbol",
    "antonym",
    "present_past",
    "singular_plural",
    "uppercase",
    "first_item",
)
CURVE_TASKS = ("uppercase", "first_item")  # ≥ 199 inputs: room for 128 calibration queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("pilot", "compare", "curves", "editing"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--model",
        default=None,
        help="as implicit-icl's --model (default: SmolLM2-135M-Instruct; e.g. gemma3-270m)",
    )
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--contexts", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    start = time.perf_counter()
    if args.part == "pilot":
        settings = StudySettings(
            search_ridges=(0.1, 1.0, 10.0, 100.0, 1000.0), search_tokens=("all", "last", "all+first"), baselines=False
        )
        records = run_many(loaded, args.tasks or PILOT_TASKS, args.contexts[:2], args.seeds[:1], settings, args.out)
        table = markdown(*pilot_table(records))
        (args.out / "pilot.md").write_text(table + "\n")
        print(table)
    elif args.part == "compare":
        settings = StudySettings(search_ranks=SEARCH_RANKS, ablations=True)
        records = run_many(loaded, args.tasks or TASKS, args.contexts, args.seeds, settings, args.out)
        curve_records = [json.loads(path.read_text()) for path in sorted((args.out / "curves" / "runs").glob("*.json"))]
        intro = comparison_intro(loaded, settings, args, len(records))
        write_comparison(args.out, records, intro, curve_records)
        print((args.out / "tables.md").read_text())
    elif args.part == "curves":  # then run "compare" again to put them in the report
        settings = StudySettings(calibration=128, search_ranks=SEARCH_RANKS)
        curves = CurveSettings(sizes=(1, 2, 4, 8, 16, 32, 64, 128), ranks=(1, 2, 4, 8, 16, 32, 64, 128))
        run_many(loaded, args.tasks or CURVE_TASKS, [0], [0], settings, args.out / "curves", curves)
    else:
        from implicit_icl.studies.editing.study import run_editing

        result = run_editing(loaded, args.out)
        print(result["table"])
    print(f"{time.perf_counter() - start:.0f} s")


def comparison_intro(loaded, settings: StudySettings, args, n_runs: int) -> str:
    config = loaded.model.config
    heads = config.num_hidden_layers * config.num_attention_heads
    return (
        f"{loaded.name} (float32). {n_runs} runs: tasks × demonstration sets {args.contexts} × seeds "
        f"{args.seeds}; K = {settings.shots} demonstrations form the context; per run up to {settings.calibration} "
        f"calibration, {settings.dev} dev and {settings.n} held-out queries, disjoint inputs of the task (fewer "
        f"where a task has fewer inputs). Compiled (default): {DEFAULT.label}, full rank. Compiled (best on dev): λ "
        "∈ {1, 10, 100} × tokens ∈ {all, last} at full rank, then for the best rank 16 and ¼ and ½ of the "
        "calibration queries. Task vector: one dummy query (the first calibration query), layer chosen on dev; also the mean over "
        "all calibration queries. Function vector: mean head outputs over the calibration prompts, indirect "
        f"effects of all {heads} heads on the dev queries with the demonstrations' labels shuffled, top k ∈ {{5, 10, 20}} "
        "heads and the layer chosen on dev."
    )


if __name__ == "__main__":
    main()
