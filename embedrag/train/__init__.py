"""The training loop and what it stands on: launch, precision, optimizer, state, checkpoints,
logs."""
