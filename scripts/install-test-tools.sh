#!/usr/bin/env bash
# Make sure the system tools behind tests/collect/ are installed: Debian's headless-capable `chromium` with its
# matching `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver; Selenium drives them, never downloading a
# browser of its own), and a PostgreSQL server (`postgresql`: initdb, pg_ctl and postgres under
# /usr/lib/postgresql/<version>/bin). The tests start their own throwaway PostgreSQL in a temporary directory, so
# no system service is started here: while installing, a temporary policy-rc.d (when none exists) keeps the
# package's cluster from being started. Does nothing when everything is already present. Chromium needs many
# shared libraries, so these are real `apt-get install`s (as root, or through sudo), not unpacked .debs.
# Used by `make tools` (and so `make test`).
#   scripts/install-test-tools.sh
set -euo pipefail

have_chromium() {
    [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]
}

postgres_bin() {
    # The newest /usr/lib/postgresql/<version>/bin that holds the server's programs, if any.
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r); do
        if [[ -x $dir/initdb && -x $dir/pg_ctl && -x $dir/postgres ]]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

packages=()
have_chromium || packages+=(chromium chromium-driver fonts-dejavu-core)
postgres_bin >/dev/null || packages+=(postgresql)
if [[ ${#packages[@]} -eq 0 ]]; then
    exit 0
fi

fail() {
    echo "install-test-tools: $*" >&2
    echo "install-test-tools: tests/collect/ need Debian's chromium, chromium-driver and postgresql packages" \
         "(or equivalents: /usr/bin/chromium, /usr/bin/chromedriver, initdb/pg_ctl/postgres); those tests are" \
         "skipped without them" >&2
    exit 1
}

command -v apt-get >/dev/null || fail "needs apt-get (Debian/Ubuntu) to install ${packages[*]}"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || fail "not root and no sudo: cannot install ${packages[*]}"
    sudo=(sudo)
fi

# Keep the package's maintainer scripts from starting a PostgreSQL service (tests start their own).
policy=/usr/sbin/policy-rc.d
made_policy=""
cleanup() {
    if [[ -n $made_policy ]]; then
        "${sudo[@]}" rm -f "$policy"
    fi
}
trap cleanup EXIT
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# Written by pickscore scripts/install-test-tools.sh for the duration of an install.\nexit 101\n' |
        "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 755 "$policy"
    made_policy=1
fi

echo "install-test-tools: installing ${packages[*]}" >&2
apt_install() {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${packages[@]}"
}
if ! apt_install; then
    # Fresh machines often have no package lists yet (or stale ones).
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || fail "apt-get update failed"
    apt_install || fail "apt-get install ${packages[*]} failed"
fi

have_chromium || fail "/usr/bin/chromium or /usr/bin/chromedriver still missing after the install"
bin=$(postgres_bin) || fail "no initdb/pg_ctl/postgres under /usr/lib/postgresql/*/bin after the install"
/usr/bin/chromium --version
/usr/bin/chromedriver --version
"$bin/postgres" --version
