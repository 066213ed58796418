"""train-student: replay loaders, losses, training loop, evaluation, checkpoints."""
