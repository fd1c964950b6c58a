"""Network architectures (``torch.nn.Module`` subclasses built from a config), nothing else."""
