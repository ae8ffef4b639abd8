#!/usr/bin/env bash
# Install Orthanc, Chromium and openssl from Debian when missing (`make test-pacs`), then run CMD [ARGS...].
#
#   tests/pacs/ensure_tools.sh CMD [ARGS...]
#
# Needs root and apt when something is missing. Nothing is started or configured here: each test starts its own
# Orthanc (config, storage and index in a temporary folder, free loopback ports) and headless Chromium, and stops
# them when it ends. Orthanc is GPL: it is an external test service, never imported by rsna19.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi

export PATH="$PATH:/usr/sbin:/sbin"  # Debian puts Orthanc in /usr/sbin
missing=()
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # the DICOM TLS tests make their own CA
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ensure_tools.sh: ${missing[*]} not installed and this is not root: apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "ensure_tools.sh: installing ${missing[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d is not touched: without an init system the package's service is not started; where one runs,
    # the Debian service listens on its own default ports, which the tests never use.
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
exec "$@"
