"""cryoprior.cluster"""
