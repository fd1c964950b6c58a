"""cryoprior.cli"""
