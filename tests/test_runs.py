"""Which run a process belongs to, and its rank, from each launcher's environment
(``scheduler.runs.run_identity``)."""

from __future__ import annotations

import pytest

from scheduler.runs import RunIdentity, run_identity

TORCHRUN = {"TORCHELASTIC_RUN_ID": "3f2a9c", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
SRUN = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}


def test_torchrun_with_a_rendezvous_id() -> None:
    assert run_identity(TORCHRUN) == RunIdentity("torchrun:3f2a9c", 3, 1, 4, 0)


def test_torchrun_without_rdzv_id_is_named_by_its_master_address() -> None:
    env = {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500",
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    assert run_identity(env) == RunIdentity("torchrun:none@10.0.0.7:29500", 0, 0, 2, 0)


def test_torchrun_none_without_a_master_address_is_not_a_run() -> None:
    env = {"TORCHELASTIC_RUN_ID": "none", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    assert run_identity(env) is None


def test_srun_names_the_run_by_job_and_step() -> None:
    assert run_identity(SRUN) == RunIdentity("slurm:1234.0", 5, 1, 8, 0)


def test_srun_without_a_step_is_not_a_run() -> None:
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}  # sbatch's batch script
    assert run_identity(env) is None


def test_open_mpi() -> None:
    env = {"OMPI_MCA_ess_base_jobid": "2818572289", "OMPI_COMM_WORLD_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "3"}
    assert run_identity(env) == RunIdentity("ompi:2818572289", 2, 0, 3, 0)


def test_open_mpi_under_pmix() -> None:
    env = {"PMIX_NAMESPACE": "prterun-host-1234@1", "OMPI_COMM_WORLD_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    assert run_identity(env) == RunIdentity("pmix:prterun-host-1234@1", 1, 1, 2, 0)


def test_pmi_hydra() -> None:
    env = {"PMI_KVSNAME": "kvs_4711_0", "PMI_RANK": "1", "MPI_LOCALRANKID": "1",
           "PMI_SIZE": "2"}
    assert run_identity(env) == RunIdentity("pmi:kvs_4711_0", 1, 1, 2, 0)


def test_local_rank_defaults_to_the_rank() -> None:
    env = {"PMI_KVSNAME": "kvs_1", "PMI_RANK": "3", "PMI_SIZE": "4"}
    assert run_identity(env) == RunIdentity("pmi:kvs_1", 3, 3, 4, 0)


def test_explicit_run_id_with_ranks() -> None:
    env = {"POWERTRAIN_RUN_ID": "exp-42", "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    assert run_identity(env) == RunIdentity("run:exp-42", 1, 0, 2, 0)


def test_explicit_run_id_wins_over_the_launcher_id() -> None:
    env = TORCHRUN | {"POWERTRAIN_RUN_ID": "exp-42"}
    assert run_identity(env) == RunIdentity("run:exp-42", 3, 1, 4, 0)


def test_explicit_run_id_without_ranks_is_one_process() -> None:
    assert run_identity({"POWERTRAIN_RUN_ID": " exp-42 "}) == RunIdentity("run:exp-42", 0, 0, 1, 0)


def test_torchrun_under_srun_is_named_and_ranked_by_torchrun() -> None:
    # srun starts one torchrun per node; torchrun's ranks are the run's, Slurm's are per node.
    env = SRUN | {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"} | TORCHRUN
    assert run_identity(env) == RunIdentity("torchrun:3f2a9c", 3, 1, 4, 0)


def test_an_elastic_restart_is_a_new_generation_of_the_same_run() -> None:
    first = run_identity(TORCHRUN | {"TORCHELASTIC_RESTART_COUNT": "0"})
    again = run_identity(TORCHRUN | {"TORCHELASTIC_RESTART_COUNT": "2", "WORLD_SIZE": "6"})
    assert first is not None and again is not None
    assert (first.key, first.generation, first.world_size) == ("torchrun:3f2a9c", 0, 4)
    assert (again.key, again.generation, again.world_size) == ("torchrun:3f2a9c", 2, 6)


def test_a_world_of_one_is_a_run() -> None:
    env = {"TORCHELASTIC_RUN_ID": "abc", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    assert run_identity(env) == RunIdentity("torchrun:abc", 0, 0, 1, 0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (TORCHRUN | {"RANK": "three"}, "RANK='three' is not an integer"),
        (TORCHRUN | {"WORLD_SIZE": "4.0"}, "WORLD_SIZE='4.0' is not an integer"),
        (TORCHRUN | {"TORCHELASTIC_RESTART_COUNT": "x"}, "TORCHELASTIC_RESTART_COUNT='x'"),
        (TORCHRUN | {"RANK": "4"}, "RANK=4 is not a rank of WORLD_SIZE=4"),
        (TORCHRUN | {"RANK": "-1"}, "RANK=-1 is not a rank of WORLD_SIZE=4"),
        (TORCHRUN | {"WORLD_SIZE": "0", "RANK": "0"}, "RANK=0 is not a rank of WORLD_SIZE=0"),
        (TORCHRUN | {"LOCAL_RANK": "-2"}, "LOCAL_RANK=-2 is negative"),
        (SRUN | {"SLURM_PROCID": "8"}, "SLURM_PROCID=8 is not a rank of SLURM_NTASKS=8"),
        # a rank without its world would make every such process rank 0 of one
        ({"TORCHELASTIC_RUN_ID": "abc", "RANK": "0"}, "RANK=0 is set but WORLD_SIZE is not"),
        ({"POWERTRAIN_RUN_ID": "x", "RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
    ],
)
def test_rank_variables_that_make_no_sense_are_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        run_identity(env)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"},  # ranks, but no launcher names a run
        {"RANK": "0"},
        {"TORCHELASTIC_RUN_ID": "abc"},  # a launcher id, but no rank and world size
        {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
        {"POWERTRAIN_RUN_ID": "   "},
    ],
)
def test_not_in_a_run(env: dict[str, str]) -> None:
    assert run_identity(env) is None
