"""cryoprior: learned priors for noisy single-particle cryo-EM.

Importing the package has no side effects: no logging set-up, no files created.
"""

__version__ = "0.1.0"
