"""Benchmarks, one module per ``cryoprior bench`` target; shared helpers in ``common``."""
