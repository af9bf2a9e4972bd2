"""Self-supervised pretraining: the run config, its image sources, the training loop, its checkpoints and schedules."""
