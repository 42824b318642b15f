"""Studies on real pretrained models: the task-suite evaluation (zero-shot vs ICL vs exact patch) and the demo.
Dynamics (dynamics*.py): the implicit update demonstration by demonstration, with controls and fine-tuning."""
