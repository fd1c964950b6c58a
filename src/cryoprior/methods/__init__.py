"""cryoprior.methods"""
