"""cryoday: ab initio cryo-EM reconstruction by stochastic optimisation and importance sampling.

The method is that of Brubaker, Punjani & Fleet, "Building Proteins in a Day" (CVPR 2015).
Conventions shared by all modules are in ``docs/conventions.md``.
"""

__version__ = "0.1.0"
