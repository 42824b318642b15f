"""Studies on real pretrained models, one folder per analysis, each owning its run (the command), its study
and its report: evaluate (the task suite: zero-shot vs ICL vs exact patch), dynamics (with controls and
fine-tuning), compile (against task and function vectors), editing (counterfactual facts), demo (the
headline run of `make run`). Studies import analyses, engine, models, tasks and report; never the CLI."""
