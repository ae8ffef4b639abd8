#!/usr/bin/env bash
# Install Debian's dicom3tools (dciodvfy) and dcmtk (dsrdump) when missing (`make test-dicom`), then run CMD [ARGS...].
#
#   tests/dicom/ensure_tools.sh CMD [ARGS...]
#
# Needs root and apt only when something is missing. Both are command-line validators run on the files the tests
# write; nothing is started or configured.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi

missing=()
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v dsrdump >/dev/null 2>&1 || missing+=(dcmtk)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ensure_tools.sh: ${missing[*]} not installed and this is not root: apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "ensure_tools.sh: installing ${missing[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
exec "$@"
