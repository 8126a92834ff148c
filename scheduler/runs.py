"""Which run a process belongs to, and its rank in it, from its launcher's environment.

A distributed run starts one process per GPU (torchrun, ``srun``, ``mpirun``), often on several
nodes; every one of them calls the training client, and all of them must join one job. The run is
named by its launcher's identity, the same in every process of it and different for every run:

- explicit: ``POWERTRAIN_RUN_ID`` names the run (ranks from any launcher below, else one
  process);
- torchrun: ``TORCHELASTIC_RUN_ID`` (``none`` without ``--rdzv-id``: then ``MASTER_ADDR`` and
  ``MASTER_PORT``); ranks ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``;
- Slurm ``srun``: ``SLURM_JOB_ID`` and ``SLURM_STEP_ID``; ranks ``SLURM_PROCID``,
  ``SLURM_LOCALID``, ``SLURM_NTASKS``;
- Open MPI: ``OMPI_MCA_ess_base_jobid`` or ``PMIX_NAMESPACE``; ranks ``OMPI_COMM_WORLD_RANK``,
  ``OMPI_COMM_WORLD_LOCAL_RANK``, ``OMPI_COMM_WORLD_SIZE``;
- MPICH / Hydra (PMI): ``PMI_KVSNAME`` or ``PMIX_NAMESPACE``; ranks ``PMI_RANK``,
  ``MPI_LOCALRANKID``, ``PMI_SIZE``.

An elastic restart (torchrun's ``TORCHELASTIC_RESTART_COUNT``) starts a new generation of the same
run, which may have another world size.

A Slurm job whose prolog registered it (``powertrain slurm prolog``, ``scheduler.cluster.slurm``)
is a job of its own before any rank starts, keyed ``slurm:<job id>`` (``slurm_allocation_key``);
the ranks of its steps (``slurm:<job id>.<step id>``) join it, each step a generation of its own
(``slurm_step_of``).

Standard library only: the training client imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "RunIdentity",
    "is_allocation_key",
    "run_identity",
    "slurm_allocation_key",
    "slurm_step_of",
]

# (rank, local rank, world size) variables, most specific launcher first.
_RANK_VARIABLES = (
    ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
    ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
)


@dataclass(frozen=True, slots=True)
class RunIdentity:
    """One process's place in a distributed run.

    Attributes:
        key: The run, as ``<launcher>:<its id>`` (``torchrun:3f2a...``, ``slurm:1234.0``, ...).
        rank / local_rank / world_size: The process's global rank, its rank on its node, and
            how many processes the run has.
        generation: The elastic restart count (0 for the first start).
    """

    key: str
    rank: int
    local_rank: int
    world_size: int
    generation: int = 0


def _int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    try:
        return int(raw) if raw else None
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def _run_key(env: Mapping[str, str]) -> str | None:
    explicit = env.get("POWERTRAIN_RUN_ID", "").strip()
    if explicit:
        return f"run:{explicit}"
    torchrun = env.get("TORCHELASTIC_RUN_ID", "").strip()
    if torchrun and torchrun != "none":
        return f"torchrun:{torchrun}"
    if torchrun == "none":  # torchrun without --rdzv-id: its master address names the run
        master = f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
        return f"torchrun:none@{master}" if master != ":" else None
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID"):
        return f"slurm:{env['SLURM_JOB_ID'].strip()}.{env['SLURM_STEP_ID'].strip()}"
    for name, launcher in (
        ("OMPI_MCA_ess_base_jobid", "ompi"),
        ("PMIX_NAMESPACE", "pmix"),
        ("PMI_KVSNAME", "pmi"),
    ):
        value = env.get(name, "").strip()
        if value:
            return f"{launcher}:{value}"
    return None


def run_identity(env: Mapping[str, str]) -> RunIdentity | None:
    """This process's run and rank, from its environment; ``None`` when it is not part of one.

    A process is part of a run when its launcher names the run and a rank and world size are
    set. A world of one is still a run (``torchrun --nproc_per_node 1``).

    Raises:
        ValueError: A rank variable is not an integer, a rank comes without its world size,
            or the rank is outside the world.
    """
    key = _run_key(env)
    if key is None:
        return None
    for rank_name, local_name, world_name in _RANK_VARIABLES:
        rank, world = _int(env, rank_name), _int(env, world_name)
        if rank is not None and world is None:
            raise ValueError(f"{rank_name}={rank} is set but {world_name} is not")
        if rank is None or world is None:
            continue
        local = _int(env, local_name)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"{rank_name}={rank} is not a rank of {world_name}={world}")
        if local is not None and local < 0:
            raise ValueError(f"{local_name}={local} is negative")
        generation = _int(env, "TORCHELASTIC_RESTART_COUNT") or 0
        return RunIdentity(key, rank, rank if local is None else local, world, generation)
    if key.startswith("run:"):  # named by hand, no launcher: one process
        return RunIdentity(key, 0, 0, 1)
    return None


def slurm_allocation_key(job_id: int | str) -> str:
    """The run key of Slurm job ``job_id``'s allocation: the job its prolog registers."""
    return f"slurm:{job_id}"


def is_allocation_key(key: str | None) -> bool:
    """Whether ``key`` names a Slurm job's allocation (``slurm:<job id>``), not a run of ranks."""
    if key is None or not key.startswith("slurm:"):
        return False
    return key.removeprefix("slurm:").isdigit()


def slurm_step_of(key: str | None) -> tuple[str, int] | None:
    """The allocation and step of a ``srun`` step's run key (``slurm:<job id>.<step id>``):
    ``(slurm_allocation_key(job id), step id)``; ``None`` for any other key."""
    if key is None or not key.startswith("slurm:"):
        return None
    job, dot, step = key.removeprefix("slurm:").partition(".")
    if not dot or not job.isdigit() or not step.isdigit():
        return None
    return slurm_allocation_key(job), int(step)
