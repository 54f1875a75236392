"""ratplus-titan: RAT+ ("Train Dense, Infer Sparse") for torchtitan.

Importing this package registers the torchtitan train spec ``ratplus``
(TOML: ``[model] name = "ratplus"``, ``[experimental] custom_import = "ratplus_titan"``).
"""

from ratplus_titan.pattern import Pattern
from ratplus_titan.train_spec import register

register()

__all__ = ["Pattern"]
