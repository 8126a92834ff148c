"""Slurm jobs as powertrain jobs (``scheduler/cluster/slurm.py``, docs/slurm.md).

Three layers:

- pure: the budget syntax of a job's comment and of the site default, the prolog's and
  epilog's environment, how a Slurm job's end maps to a powertrain state;
- the daemon's side, through its API on simulated GPUs (no Slurm needed): a Slurm job
  registered by its prolog holds its budget before any rank joins; the ranks of its steps join
  it, steps side by side; its end undoes every setting and its energy becomes final;
- marked ``slurm`` (``make test-cluster``): a real single-node Slurm (``tests/slurm_proc.py``)
  whose Prolog and Epilog run ``powertrain slurm prolog|epilog``, with ``sbatch`` jobs whose
  ``srun`` ranks use the training client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler.cluster.budgets import BudgetSpec, budget_spec, parse_budgets
from scheduler.cluster.slurm import SlurmEnvError, ending, job_budgets, slurm_job
from scheduler.jobs import Mode, OnExceed
from scheduler.runs import is_allocation_key, slurm_allocation_key, slurm_step_of
from tests.daemon_proc import REPO, DaemonProcess, powertrain, start_daemon
from tests.slurm_proc import SlurmCluster, missing

# One worker runs them all under `--dist loadgroup` (make test-cluster): they share one daemon
# and one Slurm.
pytestmark = pytest.mark.xdist_group("slurm")

TRAIN = REPO / "tests" / "jobs" / "slurm_train.py"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]

# -- the budget syntax -----------------------------------------------------------------------------


def test_a_comment_asks_for_budgets_in_one_word() -> None:
    spec = budget_spec("nightly run powertrain:watts=300,energy_wh=800,mode=auto,on_exceed=pause")
    assert spec == BudgetSpec(watts=300.0, energy_wh=800.0, mode=Mode.AUTO,
                              on_exceed=OnExceed.PAUSE)
    assert spec.words() == "powertrain:watts=300,energy_wh=800,mode=auto,on_exceed=pause"


def test_a_comment_without_the_word_asks_for_nothing() -> None:
    assert budget_spec("a plain comment") is None
    assert budget_spec(None) is None
    assert budget_spec("") is None


@pytest.mark.parametrize(("text", "says"), [
    ("powertrain:", "asks for nothing"),
    ("powertrain:watts", "'watts' is not key=value"),
    ("powertrain:watts=", "'watts=' is not key=value"),
    ("powertrain:watts=300,", "'' is not key=value"),
    ("powertrain:watts=lots", "watts='lots' is not a number (W per GPU)"),
    ("powertrain:watts=-1", "watts=-1 must be a positive number of W per GPU"),
    ("powertrain:watts=inf", "watts=inf must be a positive number"),
    ("powertrain:energy_wh=0", "energy_wh=0 must be a positive number of Wh"),
    ("powertrain:mode=fast", "mode='fast' is not one of auto, hw, clock, soft"),
    ("powertrain:on_exceed=explode", "on_exceed='explode' is not one of warn, slow, pause, stop"),
    ("powertrain:watts=300,watts=200", "watts is given twice"),
    ("powertrain:gpus=2", "unknown key 'gpus'"),
])
def test_a_malformed_word_is_refused_in_one_line(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        parse_budgets(text)
    message = str(caught.value)
    assert says in message and "\n" not in message


def test_two_budget_words_are_refused() -> None:
    with pytest.raises(ValueError, match="has 2 powertrain: words"):
        budget_spec("powertrain:watts=300 powertrain:watts=200")


def test_the_comment_overrides_the_site_default_key_by_key() -> None:
    budgets, mistake = job_budgets("powertrain:energy_wh=800", "watts=400,mode=hw")
    assert mistake is None
    assert budgets == BudgetSpec(watts=400.0, energy_wh=800.0, mode=Mode.HW)
    budgets, _ = job_budgets("powertrain:watts=250", "powertrain:watts=400")
    assert budgets.watts == 250.0


def test_a_malformed_comment_leaves_the_site_default() -> None:
    budgets, mistake = job_budgets("powertrain:watts=lots", "watts=400")
    assert budgets == BudgetSpec(watts=400.0)
    assert mistake == "--comment: watts='lots' is not a number (W per GPU)"


def test_the_site_default_setting_is_checked() -> None:
    from pydantic import ValidationError

    from scheduler.settings import Settings

    assert Settings(slurm_default=" watts=400 ").slurm_default == "watts=400"
    assert Settings(slurm_default="").slurm_default is None
    with pytest.raises(ValidationError, match="unknown key 'volts'"):
        Settings(slurm_default="volts=3")


# -- the prolog's and epilog's environment ---------------------------------------------------------

PROLOG_ENV = {"SLURM_JOB_ID": "42", "SLURM_JOB_USER": "alice", "SLURM_JOB_UID": "1000",
              "SLURM_JOB_GPUS": "2,0", "SLURM_JOB_COMMENT": "powertrain:watts=300",
              "SLURM_JOB_WORK_DIR": "/home/alice"}


def test_the_environment_names_the_job() -> None:
    job = slurm_job(PROLOG_ENV | {"SLURM_JOB_EXIT_CODE2": "3:0"})
    assert (job.job_id, job.user, job.gpus) == (42, "alice", (0, 2))
    assert (job.comment, job.work_dir, job.exit_code) == ("powertrain:watts=300", "/home/alice",
                                                          "3:0")


def test_the_user_comes_from_the_uid_when_slurm_gives_no_name() -> None:
    env = {k: v for k, v in PROLOG_ENV.items() if k != "SLURM_JOB_USER"} | {"SLURM_JOB_UID": "0"}
    assert slurm_job(env).user == "root"


def test_a_job_without_gpus_has_none() -> None:
    env = {k: v for k, v in PROLOG_ENV.items() if k != "SLURM_JOB_GPUS"}
    assert slurm_job(env).gpus == ()


@pytest.mark.parametrize(("change", "says"), [
    ({"SLURM_JOB_ID": ""}, "SLURM_JOB_ID is not set: run this as Slurm's Prolog or Epilog"),
    ({"SLURM_JOB_ID": "12_3"}, "SLURM_JOB_ID='12_3' is not a job id"),
    ({"SLURM_JOB_GPUS": "0,gpu1"}, "SLURM_JOB_GPUS='0,gpu1' is not a list of GPU indices"),
    ({"SLURM_JOB_GPUS": "1,1"}, "SLURM_JOB_GPUS='1,1' is not a list of GPU indices"),
    ({"SLURM_JOB_USER": "", "SLURM_JOB_UID": ""}, "neither SLURM_JOB_USER nor SLURM_JOB_UID"),
    ({"SLURM_JOB_USER": "", "SLURM_JOB_UID": "4294967"}, "SLURM_JOB_UID=4294967: no such user"),
])
def test_a_wrong_environment_is_one_line(change: dict[str, str], says: str) -> None:
    with pytest.raises(SlurmEnvError) as caught:
        slurm_job(PROLOG_ENV | change)
    assert str(caught.value).startswith(says) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("state", "code", "ends"), [
    ("COMPLETED", "0:0", "completed"),
    ("CANCELLED by 0", "0:15", "cancelled"),
    ("CANCELLED+", None, "cancelled"),
    ("FAILED", "3:0", "failed"),
    ("TIMEOUT", "0:15", "failed"),
    ("OUT_OF_MEMORY", "0:125", "failed"),
    # the accounting does not have the job's end yet: its exit code decides
    ("RUNNING", "0:0", "completed"),
    (None, "0:0", "completed"),
    (None, "3:0", "failed"),
    (None, "0:9", "failed"),
    (None, None, "failed"),
])
def test_how_a_slurm_job_ended(state: str | None, code: str | None, ends: str) -> None:
    got, reason = ending(state, code)
    assert got == ends and reason.startswith("Slurm")


def test_run_keys_of_an_allocation_and_its_steps() -> None:
    assert slurm_allocation_key(42) == "slurm:42"
    assert is_allocation_key("slurm:42") and not is_allocation_key("slurm:42.0")
    assert not is_allocation_key("torchrun:42") and not is_allocation_key(None)
    assert slurm_step_of("slurm:42.3") == ("slurm:42", 3)
    assert slurm_step_of("slurm:42") is None and slurm_step_of("slurm:42.batch") is None
    assert slurm_step_of("run:42.3") is None


# -- the daemon's side, without Slurm --------------------------------------------------------------


class Api:
    """A real daemon on 4 simulated GPUs, spoken to as root (an admin) over its socket."""

    def __init__(self, daemon: DaemonProcess, sock: Path, home: Path) -> None:
        self.daemon, self.sock, self.home = daemon, sock, home
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                                 base_url="http://powertrain", timeout=30)

    def get(self, path: str) -> Any:
        response = self.http.get(path)
        assert response.status_code == 200, response.text
        return response.json()

    def gpus(self) -> dict[int, dict[str, Any]]:
        return {g["index"]: g for g in self.get("/v1/gpus")}

    def allocation(self, job_id: int) -> dict[str, Any] | None:
        jobs = self.get("/v1/jobs?all=true")
        found = [j for j in jobs if j["run_key"] == slurm_allocation_key(job_id)]
        return found[-1] if found else None

    def wait(self, what: str, condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except (KeyError, IndexError, TypeError, AssertionError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; daemon log:\n"
                             f"{self.daemon.log()[-4000:]}")

    def held(self, job_id: int, gpus: list[int], watts: float) -> bool:
        """The job's power limit applied on each of ``gpus`` (the journal) and in force there
        (at most 10 % over the budget: the controller trims it on the measured average)."""
        settings = self.get(f"/v1/jobs/{job_id}/settings")
        applied = {s["gpu"] for s in settings
                   if s["setting"] == "power_limit" and s["status"] == "applied"}
        rows = self.gpus()
        return set(gpus) <= applied and all(
            rows[i]["job"] == job_id and rows[i]["power_limit_w"] <= watts * 1.1 + 0.5
            for i in gpus)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("alloc-home")
    sock_dir = Path(tempfile.mkdtemp(prefix="pt-sock-"))
    sock = sock_dir / "api.sock"
    api = Api(start_daemon(home, sock, gpus=4), sock, home)
    try:
        yield api
    finally:
        api.http.close()
        assert api.daemon.terminate() == 0, api.daemon.log()  # a test may have restarted it
        shutil.rmtree(sock_dir, ignore_errors=True)


def _slurm_id() -> int:
    return 100_000 + uuid.uuid4().int % 800_000


@pytest.fixture
def sleepers() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(SLEEPER)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
def test_a_registered_slurm_job_holds_its_budget_and_its_steps_ranks_join_it(
    api: Api, sleepers: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """Registered by its prolog, a Slurm job holds its wattage before any rank joins; the ranks
    of two steps running side by side, and a process outside any step on its GPUs, all join it;
    its ranks ending do not end it; its end (the epilog) undoes every setting, makes its energy
    final, and may come again."""
    defaults = {i: g["power_limit_w"] for i, g in api.gpus().items()}
    slurm = _slurm_id()
    body = {"slurm_job": slurm, "name": f"slurm-{slurm}", "user": "root", "gpu_ids": [1, 0],
            "watts": 300}
    first = api.http.post("/v1/allocations", json=body)
    assert first.status_code == 201, first.text
    job = first.json()
    assert (job["state"], job["gpus"], job["watts"], job["run_key"]) == (
        "running", [0, 1], 300, f"slurm:{slurm}")
    again = api.http.post("/v1/allocations", json=body)  # a prolog run again: the same job
    assert again.status_code == 201 and again.json()["id"] == job["id"]
    api.wait("the power limit on GPUs 0 and 1", lambda: api.held(job["id"], [0, 1], 300))

    def attach(run_key: str | None, rank: int, world: int, gpus: list[int]) -> dict[str, Any]:
        response = api.http.post("/v1/jobs/attach", json={
            "name": "rank", "pid": sleepers().pid, "run_key": run_key, "rank": rank,
            "local_rank": rank, "world_size": world, "gpu_ids": gpus})
        assert response.status_code == 201, response.text
        joined: dict[str, Any] = response.json()
        return joined

    step0 = [attach(f"slurm:{slurm}.0", r, 2, [0, 1]) for r in range(2)]
    step1 = attach(f"slurm:{slurm}.1", 0, 1, [1])
    batch = attach(None, 0, 1, [0])  # the batch script itself: no step, on the job's GPU
    assert {j["id"] for j in [*step0, step1, batch]} == {job["id"]}
    view = api.get(f"/v1/jobs/{job['id']}")
    members = {m["id"]: m for m in view["members"]}
    assert sorted((m["generation"], m["rank"]) for m in members.values()) == [
        (0, 0), (1, 0), (1, 1), (2, 0)], "step s is generation s + 1; the batch script 0"
    assert all(m["state"] == "running" for m in members.values()), "steps run side by side"
    assert members[step1["member_id"]]["gpus"] == [1]
    assert view["gpus"] == [0, 1], "a rank adds no GPU to the job"

    refused = api.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert refused.status_code == 409 and f"scancel {slurm}" in refused.json()["detail"]

    for m in members.values():  # every rank ends: the job goes on until its epilog
        api.http.post(f"/v1/jobs/{job['id']}/progress",
                      json={"steps": 5, "final": True, "member": m["id"], "outcome": "ok"})
    time.sleep(2.5)  # two control ticks
    assert api.get(f"/v1/jobs/{job['id']}")["state"] == "running"
    assert api.held(job["id"], [0, 1], 300)

    end = {"slurm_job": slurm, "state": "completed", "reason": "Slurm: COMPLETED (exit code 0:0)"}
    ended = api.http.post("/v1/allocations/end", json=end)
    assert ended.status_code == 200, ended.text
    assert ended.json()["state"] == "completed"
    assert ended.json()["end_reason"] == "Slurm: COMPLETED (exit code 0:0)"
    assert api.get(f"/v1/jobs/{job['id']}/settings") == []
    api.wait("the default limits", lambda: all(
        g["power_limit_w"] == defaults[i] for i, g in api.gpus().items()), 10)
    api.wait("the energy to be final",
             lambda: api.get(f"/v1/jobs/{job['id']}/energy")["complete"], 10)
    energy = api.get(f"/v1/jobs/{job['id']}/energy")
    assert energy["energy_j"] > 0 and energy["gpus"] == 2
    report = powertrain("report", "--job", str(job["id"]), "--json", "--home", str(api.home))
    (row,) = [r for r in json.loads(report.stdout) if r["key"] == str(job["id"])]
    assert energy["energy_j"] == pytest.approx(row["energy_j"], rel=1e-6)

    twice = api.http.post("/v1/allocations/end", json=end | {"state": "failed"})
    assert twice.status_code == 200 and twice.json()["state"] == "completed"


@pytest.mark.slow
def test_a_new_slurm_job_ends_one_whose_epilog_was_lost(api: Api) -> None:
    old, new = _slurm_id(), _slurm_id()
    api.http.post("/v1/allocations", json={"slurm_job": old, "name": "old", "user": "root",
                                           "gpu_ids": [2, 3], "watts": 250})
    made = api.http.post("/v1/allocations", json={"slurm_job": new, "name": "new",
                                                  "user": "root", "gpu_ids": [3]})
    assert made.status_code == 201, made.text
    stale = api.allocation(old)
    assert stale is not None and stale["state"] == "failed"
    assert stale["end_reason"] == (f"its GPUs [3] went to Slurm job {new}: its epilog never "
                                   "reached the daemon")
    assert api.get(f"/v1/jobs/{stale['id']}/settings") == []
    api.http.post("/v1/allocations/end",
                  json={"slurm_job": new, "state": "cancelled", "reason": "Slurm: CANCELLED"})


@pytest.mark.slow
@pytest.mark.parametrize(("body", "status", "says"), [
    ({"user": "no-such-user-here"}, 422, "user: no user 'no-such-user-here' on this node"),
    ({"gpu_ids": [0, 7]}, 422, "gpu_ids: no GPU [7] on this node"),
    ({"gpu_ids": [0, 0]}, 422, "gpu_ids repeats a GPU: [0, 0]"),
    ({"watts": 5}, 422, "5 W per GPU is outside the allowed range"),
])
def test_a_registration_that_cannot_be_held_is_refused(
    api: Api, body: dict[str, Any], status: int, says: str
) -> None:
    request = {"slurm_job": _slurm_id(), "name": "x", "user": "root", "gpu_ids": [0]} | body
    response = api.http.post("/v1/allocations", json=request)
    assert response.status_code == status and says.lower() in response.json()["detail"].lower(), (
        response.text)


@pytest.mark.slow
def test_ending_a_slurm_job_the_daemon_never_had(api: Api) -> None:
    response = api.http.post("/v1/allocations/end", json={
        "slurm_job": _slurm_id(), "state": "completed", "reason": "Slurm: COMPLETED"})
    assert response.status_code == 404
    assert response.json()["detail"].startswith("no job for Slurm job")


# -- a real Slurm ----------------------------------------------------------------------------------


class Node:
    """A real Slurm node (``SlurmCluster``) and its powertrain daemon."""

    def __init__(self, cluster: SlurmCluster, api: Api) -> None:
        self.cluster, self.api = cluster, api

    def sbatch(self, out: Path, gate: Path, *options: str) -> int:
        """An ``sbatch`` job of two ``srun`` ranks on two GPUs, stepping until ``gate``."""
        ranks = f"srun -n 2 {sys.executable} {TRAIN} --gate {gate} --out {out}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("POWERTRAIN_")}
        done = subprocess.run(
            ["sbatch", "--parsable", "-n", "2", "--gres=gpu:2", "-D", str(REPO),
             "-o", str(out.parent / "slurm-%j.out"), *options, "--wrap", ranks],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env=clean | self.cluster.env | {"POWERTRAIN_SOCKET": str(self.api.sock)},
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().split(";")[0])

    def wait(self, what: str, condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
        try:
            self.api.wait(what, condition, timeout_s)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.cluster.logs()}") from None

    def admin_comment(self, slurm: int) -> str:
        done = self.cluster.run("sacct", "-n", "-P", "-X", "-j", str(slurm), "-o",
                                "AdminComment%1000")
        return done.stdout.strip()

    def running(self, slurm: int, ranks: int) -> dict[str, Any]:
        """The job's view once ``ranks`` of its ranks have joined and run."""
        found: dict[str, Any] = {}

        def joined() -> bool:
            view = self.api.allocation(slurm)
            if view is None or view["state"] != "running":
                return False
            found.update(view)
            return sum(m["state"] == "running" for m in view["members"]) == ranks

        self.wait(f"{ranks} ranks of Slurm job {slurm} to join", joined)
        return found


@pytest.fixture(scope="module")
def node(api: Api) -> Iterator[Node]:
    lacking = missing()
    reason = None
    if lacking:
        reason = (f"Slurm is not installed ({', '.join(lacking)} missing): `bash .ci/slurm.sh` "
                  "installs it")
    elif os.geteuid() != 0:
        reason = "Slurm's daemons (and this test's single-node Slurm) need root"
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    cluster = SlurmCluster(api.sock, api.home)
    try:
        yield Node(cluster, api)
    finally:
        cluster.stop()


def _words(admin_comment: str) -> dict[str, str]:
    assert admin_comment.startswith("powertrain:"), admin_comment
    return dict(item.split("=", 1) for item in admin_comment.removeprefix("powertrain:").split(","))


@pytest.mark.slurm
def test_an_sbatch_job_is_held_at_its_budget_and_sacct_shows_its_energy(
    node: Node, tmp_path: Path
) -> None:
    """The acceptance: ``sbatch --gres=gpu:2 --comment=powertrain:watts=300`` on simulated
    GPUs is held at 300 W per GPU from before its ranks start; its two ``srun`` ranks are
    members of the job its prolog registered; after it ends, ``sacct`` shows its GPU energy,
    within 1 % of ``powertrain report --job``; its epilog undid every setting."""
    api = node.api
    defaults = {i: g["power_limit_w"] for i, g in api.gpus().items()}
    out, gate = tmp_path / "out", tmp_path / "gate"
    slurm = node.sbatch(out, gate, "--comment=powertrain:watts=300")
    try:
        view = node.running(slurm, 2)
        job_id, gpus = view["id"], view["gpus"]
        assert len(gpus) == 2 and view["watts"] == 300 and view["user"] == "root"
        assert sorted((m["generation"], m["rank"]) for m in view["members"]) == [(1, 0), (1, 1)]
        assert all(m["gpus"] == gpus for m in view["members"])
        for rank in (0, 1):  # what each rank found in force before it began
            limits = json.loads((out / f"rank{rank}.limits").read_text())
            assert set(map(int, limits)) == set(gpus)
            assert all(w <= 330.5 for w in limits.values()), limits
        node.wait("the budget to hold", lambda: api.held(job_id, gpus, 300) and all(
            api.gpus()[i]["power_w"] <= 300 * 1.02 for i in gpus))
    finally:
        gate.touch()
    node.wait("the epilog to write the job's energy",
              lambda: "gpu_energy_j=" in node.admin_comment(slurm))
    view = api.get(f"/v1/jobs/{job_id}")
    assert view["state"] == "completed" and "COMPLETED" in view["end_reason"]
    done = [int((out / f"rank{r}.done").read_text()) for r in (0, 1)]
    assert all(m["state"] == "completed" for m in view["members"])
    assert view["tokens"] == 100 * sum(done)

    words = _words(node.admin_comment(slurm))
    assert (words["job"], words["gpus"], words["state"], words["final"]) == (
        str(job_id), "2", "completed", "yes")
    report = powertrain("report", "--job", str(job_id), "--json", "--home", str(api.home))
    assert report.returncode == 0, report.stderr
    (row,) = [r for r in json.loads(report.stdout) if r["key"] == str(job_id)]
    assert float(words["gpu_energy_j"]) == pytest.approx(row["energy_j"], rel=0.01)
    assert float(words["gpu_energy_wh"]) == pytest.approx(row["energy_j"] / 3600, rel=0.01)

    assert api.get(f"/v1/jobs/{job_id}/settings") == []
    assert {i: g["power_limit_w"] for i, g in api.gpus().items()} == defaults
    assert f"job {job_id} of root on GPUs" in node.cluster.log("prolog.log")


@pytest.mark.slurm
def test_a_cancelled_sbatch_job_leaves_no_setting(node: Node, tmp_path: Path) -> None:
    api = node.api
    defaults = {i: g["power_limit_w"] for i, g in api.gpus().items()}
    out, gate = tmp_path / "out", tmp_path / "gate"
    slurm = node.sbatch(out, gate, "--comment=nightly powertrain:watts=250,energy_wh=500")
    view = node.running(slurm, 2)
    job_id = view["id"]
    assert (view["watts"], view["energy_wh"]) == (250, 500)
    node.wait("the budget to hold", lambda: api.held(job_id, view["gpus"], 250))
    node.cluster.run("scancel", str(slurm))
    node.wait("the epilog to write the job's energy",
              lambda: "gpu_energy_j=" in node.admin_comment(slurm))
    view = api.get(f"/v1/jobs/{job_id}")
    assert view["state"] == "cancelled", view["end_reason"]
    assert _words(node.admin_comment(slurm))["state"] == "cancelled"
    assert api.get(f"/v1/jobs/{job_id}/settings") == []
    assert {i: g["power_limit_w"] for i, g in api.gpus().items()} == defaults


@pytest.mark.slurm
def test_a_malformed_comment_runs_the_job_without_budget_and_says_why(
    node: Node, tmp_path: Path
) -> None:
    api = node.api
    out, gate = tmp_path / "out", tmp_path / "gate"
    gate.touch()  # the ranks end at once
    slurm = node.sbatch(out, gate, "--comment=powertrain:watts=lots")
    node.wait("the epilog to write the job's energy",
              lambda: "gpu_energy_j=" in node.admin_comment(slurm))
    view = api.allocation(slurm)
    assert view is not None and view["watts"] is None and view["state"] == "completed"
    words = _words(node.admin_comment(slurm))
    # sacctmgr writes it in lower case
    assert words["error"] == "--comment: watts=lots is not a number (w per gpu)"
    assert "--comment: watts='lots' is not a number" in node.cluster.log("prolog.log")


@pytest.mark.slurm
def test_the_epilog_undoes_the_settings_of_a_daemon_that_died(node: Node, tmp_path: Path) -> None:
    """The daemon dies (SIGKILL: its settings stay in force) while a Slurm job runs; the job's
    epilog finds the daemon's home unlocked, ends the job in the store and puts the GPUs back to
    their defaults through the settings journal, as the daemon would have; the daemon's next
    start finds the job ended and nothing left to undo."""
    api = node.api
    defaults = {i: g["power_limit_w"] for i, g in api.gpus().items()}
    out, gate = tmp_path / "out", tmp_path / "gate"
    slurm = node.sbatch(out, gate, "--comment=powertrain:watts=300")
    view = node.running(slurm, 2)
    node.wait("the budget to hold", lambda: api.held(view["id"], view["gpus"], 300))
    api.daemon.kill()
    try:
        gate.touch()
        node.wait("the epilog to write the job's energy",
                  lambda: "gpu_energy_j=" in node.admin_comment(slurm))
        words = _words(node.admin_comment(slurm))
        assert (words["job"], words["state"], words["final"]) == (str(view["id"]), "completed",
                                                                  "no")
        said = f"the daemon is not running: job {view['id']} ended and its settings undone here"
        assert said in node.cluster.log("epilog.log")
        shown = powertrain("gpus", "--json", "--backend", "simulated", "--home", str(api.home))
        assert shown.returncode == 0, shown.stderr
        rows = {g["index"]: g for g in json.loads(shown.stdout)}
        assert {i: g["power_limit_w"] for i, g in rows.items()} == defaults
        assert all(g["applied"] == [] for g in rows.values())
    finally:
        api.daemon = start_daemon(api.home, api.sock, gpus=4)
    ended = api.get(f"/v1/jobs/{view['id']}")
    assert ended["state"] == "completed" and "COMPLETED" in ended["end_reason"]
    assert "recovered at daemon start" not in api.daemon.log()


def test_a_rank_names_its_gpus_by_the_nodes_indices_inside_slurm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slurm numbers a confined job's CUDA_VISIBLE_DEVICES from 0; SLURM_STEP_GPUS (else
    SLURM_JOB_GPUS) has the node's indices of the same GPUs, which the daemon knows."""
    from scheduler.client import _visible_gpu_ids

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("SLURM_STEP_GPUS", raising=False)
    monkeypatch.delenv("SLURM_JOB_GPUS", raising=False)
    assert _visible_gpu_ids() == [0, 1]
    monkeypatch.setenv("SLURM_JOB_GPUS", "2,3")
    assert _visible_gpu_ids() == [2, 3]
    monkeypatch.setenv("SLURM_STEP_GPUS", "3,2")
    assert _visible_gpu_ids() == [3, 2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the script chose one of them itself
    assert _visible_gpu_ids() == [1]
