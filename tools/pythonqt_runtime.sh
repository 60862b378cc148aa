#!/bin/sh
# `make test`: make sure the PythonQt host (../shared/pythonqt, or $PQHOST_DIR) starts here, installing its Debian
# runtime packages (../shared/pythonqt/install-runtime.sh, apt-get) when it does not and this runs as root.
# CI=true: a missing host or runtime is an error. Elsewhere it is a note, and the PythonQt panel tests skip.
HOST=${PQHOST_DIR:-../shared/pythonqt}
fail() {
  if [ "$CI" = true ]; then echo "error: $1" >&2; exit 1; fi
  echo "note: $1; the PythonQt panel tests will be skipped" >&2; exit 0
}
[ -x "$HOST/run.sh" ] || fail "no PythonQt host at $HOST (put ../shared/pythonqt beside the repository or set PQHOST_DIR)"
probe() { "$HOST/run.sh" tools/pythonqt_probe.py >/dev/null 2>&1; }
probe && exit 0
if [ "$(id -u)" != 0 ]; then
  fail "the PythonQt host does not start: install its runtime once with 'sudo $HOST/install-runtime.sh'"
fi
echo "== installing the PythonQt host's runtime packages ($HOST/install-runtime.sh)"
"$HOST/install-runtime.sh" >/dev/null || fail "$HOST/install-runtime.sh failed"
probe || fail "the PythonQt host does not start even with its runtime installed: $HOST/run.sh tools/pythonqt_probe.py"
