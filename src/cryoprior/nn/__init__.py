"""The learned methods: ``models/`` (architectures only), ``training`` (the one training loop),
and one module per method (cdae, dncnn, cae, prior3d) that trains and applies it."""
