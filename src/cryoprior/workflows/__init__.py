"""Whole jobs a user runs (denoise, classify, reconstruct, train_prior3d, relion_external, demo)
and the run-folder machinery they share (``runs``)."""
