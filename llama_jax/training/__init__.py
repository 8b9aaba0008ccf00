"""Training: the run config, optimizer, the one train step, checkpoints, metrics, the loop and `plan`."""
