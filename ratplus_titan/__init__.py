"""ratplus-titan: RAT+ ("Train Dense, Infer Sparse") for torchtitan.

Importing this package from torchtitan's trainer registers the torchtitan train spec ``ratplus``
(TOML: ``[model] name = "ratplus"``, ``[experimental] custom_import = "ratplus_titan"``).
Anything else imports nothing heavy here: a command line parses its arguments (and answers
``--help``) before torch is imported. ``Pattern``, ``HeadGroups``, ``TopKPattern`` and
``parse_layer_pattern`` load on first use.
"""

import importlib
import sys
from pathlib import Path

# In a source checkout kernels/, adapters/ and eval/ sit beside this package (DESIGN §5);
# an install maps them to ratplus_titan.kernels etc. Let a checkout on PYTHONPATH do the same.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "kernels" / "recurrence.py").exists() and str(_checkout) not in __path__:
    __path__.append(str(_checkout))

_EXPORTS = {
    "HeadGroups": "ratplus_titan.head_groups",
    "parse_layer_pattern": "ratplus_titan.head_groups",
    "Pattern": "ratplus_titan.pattern",
    "TopKPattern": "ratplus_titan.topk",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ratplus_titan' has no attribute {name!r}")


# torchtitan's Trainer imports the custom_import after torchtitan itself. Whatever imports this
# package first without torchtitan and trains later (ratplus_titan.train, ratplus_titan.infra.cpu)
# imports ratplus_titan.train_spec, which registers on import.
if "torchtitan" in sys.modules:
    importlib.import_module("ratplus_titan.train_spec")
