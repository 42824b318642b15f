"""The seed paper's toy world: in-context linear regression, a small transformer, its training, the
baselines, and the experiments that compare the implicit update with explicit fine-tuning."""
