#!/usr/bin/env bash
# A throwaway PostgreSQL server for the store's tests.
#
#   source .ci/postgres.sh      # starts one (installing Debian's postgresql if missing) and
#                               # exports POWERTRAIN_TEST_PG_URL; stops it when the shell exits
#   bash .ci/postgres.sh        # same, but prints `export POWERTRAIN_TEST_PG_URL=...` and leaves
#                               # the server running: stop it with the command it prints
#
# The server lives in a temporary folder, listens on a Unix socket there only (no TCP port to
# collide with anyone else's), trusts local connections, and trades durability for speed
# (fsync off). Sourcing it again in the same shell reuses the running server. When sourced, it
# defines `powertrain_pg_cleanup` and, if the shell has no EXIT trap yet, registers it as one;
# a caller with its own EXIT trap calls `powertrain_pg_cleanup` from it.
#
# It changes no shell options of the caller. Output goes to a log in the server's folder; only
# one line is printed (to stderr). Exit status (or return status when sourced): 0 when ready.

_powertrain_pg_main() {
    local quiet_log=/dev/null

    # Reuse: a server we started earlier in this shell, or a URL the caller set on purpose.
    if [[ -n "${POWERTRAIN_TEST_PG_URL:-}" ]]; then
        if [[ -z "${POWERTRAIN_TEST_PG_DIR:-}" ]]; then
            echo "postgres.sh: using POWERTRAIN_TEST_PG_URL from the environment" >&2
            return 0
        fi
        if [[ -n "${_POWERTRAIN_PG_BIN:-}" ]] &&
            "$_POWERTRAIN_PG_BIN/pg_isready" -q -h "$POWERTRAIN_TEST_PG_DIR" -p 5432; then
            return 0
        fi
        unset POWERTRAIN_TEST_PG_URL POWERTRAIN_TEST_PG_DIR
    fi

    local bindir
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [[ -z "$bindir" || ! -x "$bindir/initdb" ]]; then
        if [[ $(id -u) -ne 0 ]]; then
            echo "postgres.sh: PostgreSQL is not installed; as root: apt-get install -y postgresql" >&2
            return 1
        fi
        # The package's own cluster (if its postinst starts one) is not used.
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends postgresql; } >"$quiet_log" 2>&1; then
            echo "postgres.sh: apt-get install postgresql failed" >&2
            return 1
        fi
        bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
        if [[ -z "$bindir" || ! -x "$bindir/initdb" ]]; then
            echo "postgres.sh: no initdb under /usr/lib/postgresql after installing" >&2
            return 1
        fi
    fi

    local dir run_as=()
    dir=$(mktemp -d "${TMPDIR:-/tmp}/powertrain-pg.XXXXXX") || return 1
    if [[ $(id -u) -eq 0 ]]; then
        # initdb refuses to run as root.
        chown postgres: "$dir" || return 1
        run_as=(runuser -u postgres --)
    fi
    local log="$dir/server.log"
    if ! "${run_as[@]}" "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 \
        --locale=C --no-sync >"$dir/initdb.log" 2>&1; then
        echo "postgres.sh: initdb failed (see $dir/initdb.log)" >&2
        return 1
    fi
    if ! "${run_as[@]}" "$bindir/pg_ctl" start -D "$dir/data" -l "$log" -w -t 60 -o \
        "-c listen_addresses='' -c unix_socket_directories='$dir' -c port=5432 -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        >"$quiet_log" 2>&1; then
        echo "postgres.sh: the server did not start (see $log)" >&2
        return 1
    fi
    if ! "$bindir/createdb" -h "$dir" -p 5432 -U postgres powertrain_test >>"$log" 2>&1; then
        echo "postgres.sh: createdb failed (see $log)" >&2
        return 1
    fi

    _POWERTRAIN_PG_BIN=$bindir
    export POWERTRAIN_TEST_PG_DIR=$dir
    export POWERTRAIN_TEST_PG_URL="postgresql+psycopg://postgres@/powertrain_test?host=$dir&port=5432"
    echo "postgres.sh: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') at $POWERTRAIN_TEST_PG_URL" >&2
    return 0
}

# Stops the server this script started and deletes its folder. Safe to call more than once.
powertrain_pg_cleanup() {
    if [[ -n "${POWERTRAIN_TEST_PG_DIR:-}" && -d "$POWERTRAIN_TEST_PG_DIR" ]]; then
        local run_as=()
        [[ $(id -u) -eq 0 ]] && run_as=(runuser -u postgres --)
        "${run_as[@]}" "${_POWERTRAIN_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}/pg_ctl" \
            stop -D "$POWERTRAIN_TEST_PG_DIR/data" -m immediate >/dev/null 2>&1
        rm -rf "$POWERTRAIN_TEST_PG_DIR"
        unset POWERTRAIN_TEST_PG_URL POWERTRAIN_TEST_PG_DIR
    fi
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # sourced
    if _powertrain_pg_main; then
        [[ -z "$(trap -p EXIT)" ]] && trap powertrain_pg_cleanup EXIT
        true
    else
        false
    fi
else
    _powertrain_pg_main || exit 1
    echo "export POWERTRAIN_TEST_PG_URL='$POWERTRAIN_TEST_PG_URL'"
    echo "# to stop it: runuser -u postgres -- $_POWERTRAIN_PG_BIN/pg_ctl stop -D $POWERTRAIN_TEST_PG_DIR/data -m immediate; rm -rf $POWERTRAIN_TEST_PG_DIR"
fi
