"""cryoprior.baselines"""
