"""cryoprior.pipelines"""
