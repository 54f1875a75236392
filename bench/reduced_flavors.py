"""Reduced-depth flavors for multi-GPU checks that must fit in minutes: ``7B_depth4`` = 7B width, 4 layers.

Use with ``--experimental.custom_import bench.reduced_flavors``.
"""

import ratplus_titan  # noqa: F401  (the train spec)
from ratplus_titan.model import RATPlusModelArgs, ratplus_flavors

ratplus_flavors["7B_depth4"] = RATPlusModelArgs(dim=4096, n_layers=4, n_heads=32)
