"""Training: the run from settings to final model, the Trainer, strategies, optimizers, checkpoints, export."""
