#!/bin/sh
# The tunlock image's entrypoint: lock the network namespace first, then run the daemon.
#
# 1. Within milliseconds of the container's start (no Python yet): if the namespace holds no
#    tunlock table, install one that blocks everything (block.nft). Other containers sharing
#    this namespace (a compose `network_mode: service:tunlock`, a Kubernetes pod) may start at
#    the same moment and must not get a packet out before the lock. A table already there is
#    kept as it is: it is the lock of an earlier run of this container (a restart), which lets
#    the tunnel it adopts go on working.
# 2. `tunlock run` reads the configuration and, as its first action, replaces that table with
#    the real lock in one transaction, then connects. A broken configuration makes it exit
#    non-zero with `file:line: reason`, and the namespace stays blocked.
#
# `tunlock-entrypoint block` does step 1 only and exits: a one-shot init container that locks a pod
# before its other containers start, where native sidecars are missing (podman kube play,
# Kubernetes before 1.29).
#
# The table is named by TUNLOCK_LOCK_TABLE (default "tunlock"), exported to the daemon so that it
# replaces the very table blocked here: in a container this wins over lock.table in the file.
set -u
block_only=false
if [ "${1:-}" = block ]; then
  block_only=true
  shift
fi
table=${TUNLOCK_LOCK_TABLE:-tunlock}
case $table in
  [A-Za-z]*) ;;
  *) table=- ;;
esac
case $table in
  -|*[!A-Za-z0-9_]*)
    echo "tunlock-entrypoint: TUNLOCK_LOCK_TABLE must be a letter then letters, digits or _" >&2
    exit 2 ;;
esac

if nft list table inet "$table" >/dev/null 2>&1; then
  echo "tunlock-entrypoint: locked: kept table inet $table, already in place (a restart)" >&2
elif sed "s/@TABLE@/$table/g" /usr/share/tunlock/block.nft | nft -f -; then
  echo "tunlock-entrypoint: locked: table inet $table blocks everything until the daemon's lock" \
    "replaces it" >&2
else
  echo "tunlock-entrypoint: could not install the lock (table inet $table): the container" \
    "needs the NET_ADMIN capability" >&2
  exit 1
fi
$block_only && exit 0
export TUNLOCK_LOCK_TABLE="$table"
exec tunlock run "$@"
