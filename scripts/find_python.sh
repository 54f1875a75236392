# Sourced (from the repository root) by run_train.sh and scripts/adapt_chain.sh: sets PYTHON to the
# interpreter to use, or stops with one line saying how to get one.
#   PYTHON set: that one;  else .venv/bin/python (what `make install` creates) if it exists;  else python.
# shellcheck shell=bash
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python; fi
fi
_how="run 'make install' (creates .venv), activate the environment ratplus-titan is installed in, or set PYTHON=/path/to/its/python"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "$(basename "$0"): error: PYTHON=$PYTHON is not found: $_how" >&2
  exit 2
fi
# (the repository root is on the path of `python -c`, so ratplus_titan itself is always found there)
_missing=$("$PYTHON" -c 'import importlib.util as u
print(", ".join(m for m in ("torch", "torchtitan", "ratplus_titan") if u.find_spec(m) is None))')
if [ -n "$_missing" ]; then
  echo "$(basename "$0"): error: PYTHON=$PYTHON cannot import $_missing: $_how" >&2
  exit 2
fi
unset _how _missing
