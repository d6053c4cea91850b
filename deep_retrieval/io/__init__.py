"""Files written so that a crash never leaves a partial one, and untrusted
PyTorch checkpoints and pickles read without running anything they name."""
