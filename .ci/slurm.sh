#!/bin/sh
# Install Debian's Slurm (slurmctld, slurmd, slurmdbd and the client commands), MUNGE and MariaDB
# for the tests marked `slurm` (tests/test_slurm.py), quietly and only when something is missing.
# Needs root (apt-get); does nothing when they are all there. The tests start a single-node
# cluster of their own in a temporary folder (tests/slurm_proc.py: munged, MariaDB, slurmdbd,
# slurmctld, slurmd on free loopback ports): the services these packages set up are not used.
set -eu
have() {
    for cmd in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch srun \
        scancel scontrol sinfo sacct sacctmgr; do
        command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || [ -x "/usr/bin/$cmd" ] ||
            return 1
    done
}
if have; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurmdbd slurm-client munge \
    mariadb-server >/dev/null
have
