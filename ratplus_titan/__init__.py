"""ratplus-titan: RAT+ ("Train Dense, Infer Sparse") for torchtitan.

Importing this package registers the torchtitan train spec ``ratplus``
(TOML: ``[model] name = "ratplus"``, ``[experimental] custom_import = "ratplus_titan"``).
"""

from pathlib import Path

# In a source checkout kernels/, adapters/ and eval/ sit beside this package (DESIGN §5);
# an install maps them to ratplus_titan.kernels etc. Let a checkout on PYTHONPATH do the same.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "kernels" / "recurrence.py").exists() and str(_checkout) not in __path__:
    __path__.append(str(_checkout))

from ratplus_titan.head_groups import HeadGroups, parse_layer_pattern  # noqa: E402
from ratplus_titan.pattern import Pattern  # noqa: E402
from ratplus_titan.topk import TopKPattern  # noqa: E402
from ratplus_titan.train_spec import register  # noqa: E402

register()

__all__ = ["HeadGroups", "Pattern", "TopKPattern", "parse_layer_pattern"]
