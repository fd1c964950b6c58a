"""cryoprior.models"""
