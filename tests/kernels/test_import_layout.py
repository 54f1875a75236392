"""The import layout of kernels/ (kernels/__init__.py): references import no fast path and no dispatch module.

Each module is imported in a fresh interpreter and ``sys.modules`` is checked afterwards; imports
inside functions (which only run on CUDA) are checked by reading the module's import statements.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"
FAST_SUFFIXES = ("_triton", "_flex")


def kernel_modules(kind: str) -> list[str]:
    """Module names under kernels/ of one kind: ``fast``, ``dispatch`` or ``reference``."""
    names = sorted(p.stem for p in KERNELS.glob("*.py") if p.stem != "__init__")
    fast = [n for n in names if n.endswith(FAST_SUFFIXES)]
    dispatch = [n for n in names if n.endswith("_dispatch")]
    return {"fast": fast, "dispatch": dispatch, "reference": sorted(set(names) - set(fast) - set(dispatch))}[kind]


# Run in a fresh interpreter: map ``ratplus_titan`` and its kernels by path, as an install does,
# without running the package's __init__ (which, under torchtitan, registers the train spec and so
# imports the model and the dispatch modules).
_IMPORT_BARE = """
import importlib, json, sys, types
for name, folder in (("ratplus_titan", "ratplus_titan"), ("ratplus_titan.kernels", "kernels")):
    module = types.ModuleType(name)
    module.__path__ = [{root!r} + "/" + folder]
    sys.modules[name] = module
importlib.import_module("ratplus_titan.kernels." + {module!r})
print(json.dumps(sorted(sys.modules)))
"""


def imported_after(code: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_layout_has_each_kind():
    assert {"pattern_attention", "topk_attention", "recurrence", "decode"} <= set(kernel_modules("reference"))
    assert {"pattern_attention_triton", "pattern_attention_flex", "recurrence_triton", "decode_triton"} <= set(
        kernel_modules("fast")
    )
    assert {"pattern_attention_dispatch", "recurrence_dispatch", "decode_dispatch"} <= set(kernel_modules("dispatch"))


@pytest.mark.parametrize("module", kernel_modules("reference"))
def test_reference_imports_no_fast_path_in_a_fresh_interpreter(module):
    loaded = imported_after(_IMPORT_BARE.format(root=str(ROOT), module=module))
    assert f"ratplus_titan.kernels.{module}" in loaded
    forbidden = {f"ratplus_titan.kernels.{m}" for m in kernel_modules("fast") + kernel_modules("dispatch")}
    assert not loaded & forbidden, f"importing {module} imported {sorted(loaded & forbidden)}"


def imported_names(path: Path) -> set[str]:
    """Every module an ``import`` statement anywhere in ``path`` names (function bodies too), as kernel stems."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n.removeprefix("ratplus_titan.kernels.").lstrip(".") for n in names}


@pytest.mark.parametrize("module", kernel_modules("reference"))
def test_reference_has_no_deferred_import_of_a_fast_path(module):
    named = imported_names(KERNELS / f"{module}.py")
    forbidden = set(kernel_modules("fast") + kernel_modules("dispatch"))
    assert not named & forbidden, f"{module}.py imports {sorted(named & forbidden)}"


def test_importing_the_package_imports_no_fast_path():
    """As torchtitan's trainer imports it (``custom_import``, torchtitan loaded): the train spec and the model."""
    loaded = imported_after("import json, sys, torchtitan, ratplus_titan; print(json.dumps(sorted(sys.modules)))")
    fast = {f"ratplus_titan.kernels.{m}" for m in kernel_modules("fast")}
    assert "ratplus_titan.kernels.pattern_attention_dispatch" in loaded  # the model was imported
    assert not loaded & fast, sorted(loaded & fast)
