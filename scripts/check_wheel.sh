#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it (not editable) into a fresh virtualenv, and
# from a folder outside the repository list and validate the shipped configs and run the demo.
#   bash scripts/check_wheel.sh            # the demo on the test recipe (fast once the test lab is cached)
#   bash scripts/check_wheel.sh --full     # the README's demo (default recipe)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q "torch==2.13.0"          # the CPU build (see scripts/setup.sh)
"$work/venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" .
"$work/venv/bin/python" -m pip install -q "$work"/dist/unbackdoor-*.whl
ub="$work/venv/bin/unbackdoor"
mkdir "$work/elsewhere" && cd "$work/elsewhere"
"$work/venv/bin/python" -c "import unbackdoor, sys; assert '/site-packages/' in unbackdoor.__file__, unbackdoor.__file__"
"$ub" ls configs > ls.txt && grep -q "configs/crow/official.yaml" ls.txt
"$ub" validate configs/crow/official.yaml configs/bench/demo.yaml crow/lab sande/official.yaml
if "$ub" validate configs/crow/offical.yaml > out.txt 2>&1; then echo "a misspelt config name validated"; exit 1; fi
grep -q "Did you mean the shipped config 'crow/official.yaml'" out.txt
if [ "${1:-}" = "--full" ]; then
  "$ub" demo --out demo
else
  "$ub" demo --out demo grid.recipe=test
fi
test -s demo/report.md && test -s demo/results.json
echo "wheel ok: installed $(ls "$work"/dist), validated and ran the demo from $(pwd)"
