#!/usr/bin/env bash
# Installs the pinned kubernetes-validate (offline JSON-schema validation of Kubernetes
# manifests, with the schemas of every Kubernetes minor it ships) and its pinned dependencies
# from PyPI into $CACHE/kubernetes-validate with `pip install --target`: nothing is installed
# into any Python's site-packages. Debian's /usr/bin/python3 (bookworm: 3.11) runs it, the
# same interpreter the tests use, so the compiled wheels (rpds-py) match.
# Idempotent: skipped when that directory already holds exactly these pins.
#   run:  PYTHONPATH=$CACHE/kubernetes-validate /usr/bin/python3 -m kubernetes_validate --strict -k 1.30.0 FILE
set -euo pipefail
CACHE=${GUESTPULL_LAB_CACHE:-/var/cache/guestpull-lab}
PYTHON=/usr/bin/python3
DEST=$CACHE/kubernetes-validate
# kubernetes-validate 1.37.0 ships schemas for Kubernetes 1.25 through 1.37.
PINS=(
    kubernetes-validate==1.37.0
    jsonschema==4.26.0
    jsonschema-specifications==2025.9.1
    referencing==0.37.0
    rpds-py==2026.9.1
    attrs==26.1.0
    PyYAML==6.0.4
    packaging==26.4
    importlib-resources==7.1.0
    typing-extensions==4.16.0
)
STAMP=$DEST/.guestpull-pins
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PINS[*]}" ]; then
    echo "fetch-kubernetes-validate: present in $DEST"
    exit 0
fi
"$PYTHON" -m pip --version >/dev/null 2>&1 || {
    echo "fetch-kubernetes-validate: $PYTHON has no pip: apt-get install python3-pip (.ci/packages.txt)" >&2
    exit 1
}
rm -rf "$DEST.new"
# --no-deps with every dependency pinned: the tree is exactly the list above.
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install -q --no-cache-dir --no-deps --root-user-action=ignore \
    --only-binary=:all: --target "$DEST.new" "${PINS[@]}"
PYTHONPATH=$DEST.new "$PYTHON" -m kubernetes_validate --version >/dev/null
echo "${PINS[*]}" > "$DEST.new/.guestpull-pins"
rm -rf "$DEST"
mv "$DEST.new" "$DEST"
echo "fetch-kubernetes-validate: ${PINS[0]} -> $DEST"
