"""Import ``ratplus_titan`` on the device machine, which has no torchtitan or ``datasets``.

``ratplus_titan/__init__`` registers the torchtitan train spec; when that import fails, the package
and its kernels are mapped by path (bare modules), so the kernel and model files import alone.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path


def import_without_train_spec() -> None:
    try:
        import ratplus_titan  # noqa: F401
    except ImportError:
        root = Path(__file__).resolve().parents[1]
        for name, folder in (("ratplus_titan", "ratplus_titan"), ("ratplus_titan.kernels", "kernels")):
            module = types.ModuleType(name)
            module.__path__ = [str(root / folder)]
            sys.modules[name] = module
