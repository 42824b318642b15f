"""Studies on real pretrained models: the task-suite evaluation (zero-shot vs ICL vs exact patch) and the demo."""
