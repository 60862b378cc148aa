#!/bin/sh
# make mutation: mutmut over the modules where a silent bug moves a box ([tool.mutmut] in pyproject.toml,
# results and survivors in docs/testing.md). Not part of make test or CI.
#
# mutmut names a mutant by its file's path, and the tests import the Slicer module's core as the top-level package
# MiniGPTMedSlicerLib: so the run happens in a staging copy (build/mutation) where that package sits at the top,
# as it is imported. Usage: tools/mutation.sh [MUTANT-GLOB...], e.g. tools/mutation.sh 'backend.box_codecs*'
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
STAGE=${MUTATION_DIR:-$ROOT/build/mutation}
rm -rf "$STAGE"
mkdir -p "$STAGE"
STAGE=$(cd "$STAGE" && pwd)  # absolute: the run happens inside it
cp -r "$ROOT/backend" "$ROOT/headless" "$ROOT/Testing" "$ROOT/pyproject.toml" "$STAGE/"
cp -r "$ROOT/MiniGPTMedSlicer/MiniGPTMedSlicerLib" "$STAGE/MiniGPTMedSlicerLib"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
cd "$STAGE"
# MUTATION_FILES / MUTATION_TESTS (space-separated): narrow [tool.mutmut]'s only_mutate / test selection for one run,
# e.g. one module and the fast tests that reach it (docs/testing.md has the per-module commands)
if [ -n "${MUTATION_FILES:-}${MUTATION_TESTS:-}" ]; then
    "$VENV/bin/python" - "${MUTATION_FILES:-}" "${MUTATION_TESTS:-}" <<'PY'
import re, sys
s = open("pyproject.toml").read()
for key, arg in (("only_mutate", sys.argv[1]), ("pytest_add_cli_args_test_selection", sys.argv[2])):
    if arg.split():
        items = ", ".join(f'"{x}"' for x in arg.split())
        s = re.sub(rf"^{key} = \[.*?^\]", f"{key} = [{items}]", s, count=1, flags=re.S | re.M)
open("pyproject.toml", "w").write(s)
PY
fi
unset PYTHONPATH  # only the mutated copy may be importable
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false QT_QPA_PLATFORM=offscreen
export VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow
start=$(date +%s)
nice -n 15 "$VENV/bin/mutmut" run --max-children "${MUTATION_JOBS:-1}" "$@" || true
echo "mutmut run: $(( $(date +%s) - start )) s"
"$VENV/bin/mutmut" results --all true > "$STAGE/results.txt" || true
"$VENV/bin/python" - "$STAGE/results.txt" <<'PY'
import collections, sys
by = collections.defaultdict(collections.Counter)
for line in open(sys.argv[1]):
    name, _, status = line.strip().rpartition(": ")
    if name and status != "not checked":  # not checked: outside the run's mutant globs
        by[name.split(".x_")[0].split(".x\u01c1")[0]][status] += 1  # module.x_function__mutmut_N
print(f"{'module':40} {'killed':>7} {'total':>6} score  (survived / no tests / timeout)")
for mod, c in sorted(by.items()):
    total = sum(c.values())
    bad = c["survived"] + c["no tests"]  # a timeout counts as killed
    print(f"{mod:40} {total - bad:7} {total:6} {100 * (total - bad) / total:5.1f}%  {dict(c)}")
# service.py and app.py are mutated whole, but only their request validation and token check are in scope: the
# score of those functions by name (the rest of the two files has no selected test: "no tests")
scope = ("backend.service.x\u01c1AnalysisService\u01c1" + f for f in ("prepare", "_image", "_history", "decode_upload", "store_image", "_values"))
scope = (*scope, "backend.service.x__unsupported_message", "backend.app.x\u01c1GuardMiddleware\u01c1", "backend.app.x__header", "backend.app.x__replay")
fn = collections.defaultdict(collections.Counter)
for line in open(sys.argv[1]):
    name, _, status = line.strip().rpartition(": ")
    if name.startswith(scope) and status != "not checked":
        fn[name.split("__mutmut_")[0]][status] += 1
if fn:
    print(f"\n{'validation and token check (by function)':60} {'killed':>7} {'total':>6} score")
    for name, c in sorted(fn.items()):
        total = sum(c.values())
        bad = c["survived"] + c["no tests"]
        print(f"{name:60} {total - bad:7} {total:6} {100 * (total - bad) / total:5.1f}%  {dict(c)}")
    t = sum((c for c in fn.values()), collections.Counter())
    total, bad = sum(t.values()), t["survived"] + t["no tests"]
    print(f"{'together':60} {total - bad:7} {total:6} {100 * (total - bad) / total:5.1f}%")
PY
echo "survivors: cd $STAGE && $VENV/bin/mutmut show NAME (list in $STAGE/results.txt)"
