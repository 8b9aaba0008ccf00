"""Training: the run config, the update rule (AdamW, the train step), metrics, the Trainer and `plan`."""
