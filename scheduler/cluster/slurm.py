"""``powertrain slurm prolog|epilog``: a Slurm job is one powertrain job, from its prolog to its
epilog (docs/slurm.md).

Slurm runs both as root on every node of a job (``Prolog=``/``Epilog=`` in slurm.conf, with
``PrologFlags=Alloc`` so that the prolog runs when the job is allocated, before it starts), with
the job in their environment: ``SLURM_JOB_ID``, ``SLURM_JOB_USER``/``SLURM_JOB_UID``,
``SLURM_JOB_GPUS`` (the node's GPUs of the job, which must be NVML's indices: gres.conf lists
``/dev/nvidiaN`` in order, or ``AutoDetect=nvml``), ``SLURM_JOB_COMMENT`` (22.05 and later), and
in the epilog ``SLURM_JOB_EXIT_CODE2``.

- **prolog**: registers the job with this node's daemon (``POST /v1/allocations``): the user,
  its GPUs on this node, and the budgets of its comment (``--comment=powertrain:watts=300``,
  ``scheduler.cluster.budgets``) over the site default (``POWERTRAIN_SLURM_DEFAULT``). It
  returns once the daemon holds the wattage budget (the power limit or the locked clocks in
  force on every GPU, as the settings journal says; in soft mode, once the mode is chosen). The
  job's ranks (``srun``) then join that job: each step is a generation of it.
- **epilog**: ends the job (completed, failed or cancelled, as Slurm's accounting or the exit
  code says), which undoes every GPU setting made for it; checks that none is left; waits until
  the job's GPU energy is final (samples stored past its end) and writes it to the job's
  AdminComment in Slurm's accounting (``sacctmgr modify job``; ``sacct -o AdminComment`` shows
  it) as ``powertrain:job=7,gpu_energy_j=...,gpu_energy_wh=...``: the same figure as
  ``powertrain report --job 7``.

What goes wrong never ends in a traceback: one line on stderr (the slurm.conf wrapper appends it
to a log), and for the job's user, in its AdminComment where Slurm allows it. A failing prolog or
epilog drains the node, so:

- the prolog fails only with ``POWERTRAIN_SLURM_STRICT`` (the job's budgets could not be
  registered or applied: the node is drained, the job requeued); else the job runs without them.
  A malformed comment never fails it: the job runs under the site default, and the mistake is
  written to its AdminComment.
- the epilog fails only when a setting made for the job may still be in force: the daemon is
  unreachable while its home lock is held (it hangs), or undoing failed. A daemon that is not
  running at all is stood in for: the epilog ends the job in the store itself and undoes its
  settings through the settings journal, as the daemon would have (``_end_without_daemon``).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from energy.units import j_to_wh
from scheduler.apiclient import DaemonClient, DaemonError
from scheduler.cluster.budgets import PREFIX, BudgetSpec, budget_spec, parse_budgets
from scheduler.settings import Settings

__all__ = ["SlurmJob", "ending", "slurm", "slurm_job"]

log = logging.getLogger("powertrain.slurm")

slurm = typer.Typer(
    help="Slurm's Prolog and Epilog: a Slurm job is one powertrain job (docs/slurm.md).",
    no_args_is_help=True,
)

EndState = Literal["completed", "failed", "cancelled"]

_SLURM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
"""Where Slurm's commands are looked for: a prolog's environment has no PATH of its own."""

_POLL_S = 0.2
_FINAL_STATES = frozenset({"CANCELLED", "COMPLETED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY",
                           "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"})
"""The states of an ended job in Slurm's accounting."""
_COMMAND_TIMEOUT_S = 20.0


class SlurmEnvError(ValueError):
    """The prolog's or epilog's environment does not describe a Slurm job (one line)."""


@dataclass(frozen=True, slots=True)
class SlurmJob:
    """A Slurm job as its prolog or epilog sees it.

    Attributes:
        job_id: ``SLURM_JOB_ID``.
        user: Its user's login name (``SLURM_JOB_USER``, else ``SLURM_JOB_UID``'s).
        gpus: Its GPUs on this node (``SLURM_JOB_GPUS``); empty: none.
        comment: Its ``--comment`` (``SLURM_JOB_COMMENT``), or ``None``.
        work_dir: Its working directory (``SLURM_JOB_WORK_DIR``), or ``None``.
        exit_code: ``SLURM_JOB_EXIT_CODE2`` (``exit:signal``) in the epilog, or ``None``.
    """

    job_id: int
    user: str
    gpus: tuple[int, ...]
    comment: str | None
    work_dir: str | None
    exit_code: str | None


def slurm_job(env: Mapping[str, str]) -> SlurmJob:
    """The Slurm job a prolog or epilog runs for, from its environment.

    Raises:
        SlurmEnvError: ``SLURM_JOB_ID`` is missing or not a job id, the user is unknown, or
            ``SLURM_JOB_GPUS`` is not a list of GPU indices (one line naming the variable).
    """
    raw_id = env.get("SLURM_JOB_ID", "").strip()
    if not raw_id:
        raise SlurmEnvError("SLURM_JOB_ID is not set: run this as Slurm's Prolog or Epilog")
    if not raw_id.isdigit() or int(raw_id) < 1:
        raise SlurmEnvError(f"SLURM_JOB_ID={raw_id!r} is not a job id")
    user = env.get("SLURM_JOB_USER", "").strip()
    if not user:
        raw_uid = env.get("SLURM_JOB_UID", "").strip()
        if not raw_uid.isdigit():
            raise SlurmEnvError("neither SLURM_JOB_USER nor SLURM_JOB_UID names the job's user")
        try:
            user = pwd.getpwuid(int(raw_uid)).pw_name
        except KeyError:
            raise SlurmEnvError(f"SLURM_JOB_UID={raw_uid}: no such user on this node") from None
    raw_gpus = env.get("SLURM_JOB_GPUS", "").strip()
    try:
        gpus = tuple(int(part) for part in raw_gpus.split(",")) if raw_gpus else ()
    except ValueError:
        raise SlurmEnvError(
            f"SLURM_JOB_GPUS={raw_gpus!r} is not a list of GPU indices such as 0,1"
        ) from None
    if any(i < 0 for i in gpus) or len(set(gpus)) != len(gpus):
        raise SlurmEnvError(f"SLURM_JOB_GPUS={raw_gpus!r} is not a list of GPU indices")
    return SlurmJob(
        job_id=int(raw_id), user=user, gpus=tuple(sorted(gpus)),
        comment=env.get("SLURM_JOB_COMMENT") or None,
        work_dir=env.get("SLURM_JOB_WORK_DIR") or None,
        exit_code=env.get("SLURM_JOB_EXIT_CODE2") or None,
    )


def job_budgets(comment: str | None, default: str | None) -> tuple[BudgetSpec, str | None]:
    """The budgets a job runs under: its comment's over the site default; and what was wrong
    with the comment (it is then left out), or ``None``."""
    base = parse_budgets(default) if default else BudgetSpec()
    try:
        own = budget_spec(comment)
    except ValueError as exc:
        return base, f"--comment: {exc}"
    return (base if own is None else own.over(base)), None


def ending(state: str | None, exit_code: str | None) -> tuple[EndState, str]:
    """How a Slurm job ended, for its powertrain job: its state in Slurm's accounting
    (``CANCELLED by 0``, ``COMPLETED``, ``TIMEOUT``, ...; ``None`` or a state that is not final:
    unknown), else its ``exit:signal`` code."""
    word = (state or "").split()[0].rstrip("+") if state and state.strip() else ""
    code = f" (exit code {exit_code})" if exit_code else ""
    if word == "CANCELLED":
        return "cancelled", f"Slurm: {state.strip() if state else word}{code}"
    if word == "COMPLETED":
        return "completed", f"Slurm: COMPLETED{code}"
    if word in _FINAL_STATES:
        return "failed", f"Slurm: {word}{code}"
    status, _, signal = (exit_code or "").partition(":")
    if not status.isdigit() or (signal and not signal.isdigit()):
        return "failed", "Slurm gave no exit code"
    if int(status) == 0 and int(signal or 0) == 0:
        return "completed", "Slurm: exit code 0:0"
    if int(signal or 0):
        return "failed", f"Slurm: killed by signal {signal} (exit code {exit_code})"
    return "failed", f"Slurm: exit code {exit_code}"


# -- Slurm's commands ------------------------------------------------------------------------------


def _command(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH") or _SLURM_PATH) or shutil.which(
        name, path=_SLURM_PATH
    )


def _run(args: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
    """Run one of Slurm's commands; ``None`` when it is not installed or does not answer."""
    path = _command(args[0])
    if path is None:
        log.warning("%s is not installed (looked in PATH and %s)", args[0], _SLURM_PATH)
        return None
    try:
        return subprocess.run([path, *args[1:]], capture_output=True, text=True,
                              timeout=_COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s failed: %s", args[0], exc)
        return None


def _said(done: subprocess.CompletedProcess[str]) -> str:
    return " ".join((done.stderr or done.stdout or f"exit {done.returncode}").split())


def accounted(job_id: int) -> tuple[str | None, str | None]:
    """The job's final (state, exit code) in Slurm's accounting (``sacct``); ``(None, None)``
    when it has none (no slurmdbd, or the job's end has not reached it yet)."""
    done = _run(["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State,ExitCode"])
    if done is None or done.returncode != 0:
        return None, None
    for line in done.stdout.splitlines():
        state, _, code = line.partition("|")
        if state.split() and state.split()[0].rstrip("+") in _FINAL_STATES:
            return state.strip(), code.strip() or None
    return None, None


def controller_exit_code(job_id: int) -> str | None:
    """The job's ``ExitCode`` as the controller has it (``scontrol show job``), or ``None``."""
    done = _run(["scontrol", "-o", "show", "job", str(job_id)])
    if done is None or done.returncode != 0:
        return None
    for word in done.stdout.split():
        if word.startswith("ExitCode="):
            return word.removeprefix("ExitCode=")
    return None


def write_admin_comment(job_id: int, text: str, *, ended: bool, timeout_s: float) -> str | None:
    """Write ``text`` as the job's AdminComment: in the accounting (``sacctmgr``) once the job
    has ended, where ``sacct`` shows it; in the controller (``scontrol update``) while it runs,
    where ``scontrol show job`` shows it (the controller refuses to change an ended job).
    Returns why it could not be written, or ``None`` when it was."""
    if not ended:
        done = _run(["scontrol", "update", f"JobId={job_id}", f"AdminComment={text}"])
        if done is None:
            return "scontrol is not installed"
        return None if done.returncode == 0 else f"scontrol update: {_said(done)}"
    deadline = time.monotonic() + timeout_s
    while True:  # the job's record may reach slurmdbd a moment after its end
        done = _run(["sacctmgr", "-i", "modify", "job", "where", f"jobid={job_id}", "set",
                     f"AdminComment={text}"])
        if done is None:
            return "sacctmgr is not installed"
        if done.returncode == 0 and "Modified" in done.stdout:
            return None
        if done.returncode != 0 or time.monotonic() > deadline:
            return f"sacctmgr modify job: {_said(done)}"
        time.sleep(0.5)


def _words(**values: Any) -> str:
    """``powertrain:key=value,...``; a value ``None`` is left out. An error goes last and runs
    to the end (it may hold commas), on one line and without quotes: ``sacctmgr`` turns quotes
    into backquotes (and every letter into lower case)."""
    error = values.pop("error", None)
    parts = [f"{k}={v}" for k, v in values.items() if v is not None]
    if error:
        text = " ".join(str(error).split())
        parts.append("error=" + "".join(c for c in text if c not in "'\"`"))
    return PREFIX + ",".join(parts)


# -- the commands ----------------------------------------------------------------------------------

SocketOpt = Annotated[
    Path | None,
    typer.Option("--socket", help="The daemon's API socket. Env: POWERTRAIN_SOCKET."),
]


def _setup_logging(step: str, job_id: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s powertrain slurm {step} (job {job_id}) %(levelname)s: %(message)s"
    ))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _settings(socket: Path | None) -> Settings:
    from pydantic import ValidationError

    try:
        return Settings() if socket is None else Settings(socket=socket)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise SlurmEnvError(f"POWERTRAIN_{where.upper()}: {message}") from None


@slurm.command()
def prolog(
    socket: SocketOpt = None,
    timeout_s: Annotated[float, typer.Option(
        "--timeout", min=1.0, help="Seconds to wait for the daemon to hold the budget.")] = 30.0,
) -> None:
    """Slurm's Prolog (PrologFlags=Alloc): register the job and hold its budgets before it starts."""  # noqa: E501 - one paragraph, one line (Rich keeps line breaks)
    _setup_logging("prolog", os.environ.get("SLURM_JOB_ID", "?"))
    strict = False
    try:
        settings = _settings(socket)
        strict = settings.slurm_strict
        job = slurm_job(os.environ)
    except SlurmEnvError as exc:
        log.error("%s", exc)
        raise typer.Exit(1 if strict else 0) from None
    code = _prolog(job, settings, timeout_s)
    raise typer.Exit(code)


def _prolog(job: SlurmJob, settings: Settings, timeout_s: float) -> int:
    budgets, mistake = job_budgets(job.comment, settings.slurm_default)
    if mistake is not None:
        log.error("%s; the job runs under %s", mistake,
                  "the site default " + budgets.words() if not budgets.empty else "no budget")
        _note(job.job_id, _words(error=f"{mistake} (the job runs under "
                                 f"{budgets.words() if not budgets.empty else 'no budget'})"))
    if not job.gpus:
        log.info("no GPU on this node: nothing to hold")
        return 0
    body = {
        "slurm_job": job.job_id, "name": f"slurm-{job.job_id}", "user": job.user,
        "gpu_ids": list(job.gpus), "cwd": job.work_dir if job.work_dir
        and job.work_dir.startswith("/") else None,
        "watts": budgets.watts, "energy_wh": budgets.energy_wh,
        "mode": (budgets.mode.value if budgets.mode else "auto"),
        "on_exceed": (budgets.on_exceed.value if budgets.on_exceed else "warn"),
    }
    try:
        with DaemonClient(settings.socket_path) as client:
            view: dict[str, Any] = client.request("POST", "/v1/allocations", json=body)
            held = _wait_held(client, view["id"], job.gpus, budgets, timeout_s)
    except (DaemonError, TimeoutError) as exc:
        what = "not registered" if isinstance(exc, DaemonError) else "registered"
        log.error("%s; the job's budgets (%s) are %s%s", exc, budgets.words(), what,
                  ": the prolog fails (POWERTRAIN_SLURM_STRICT)" if settings.slurm_strict
                  else ", and it runs without them")
        _note(job.job_id, _words(error=f"budgets {budgets.words()} not held: {exc}"))
        return 1 if settings.slurm_strict else 0
    log.info("job %d of %s on GPUs %s: %s", view["id"], job.user, list(job.gpus), held)
    return 0


def _note(job_id: int, text: str) -> None:
    """Tell the job's user through its AdminComment (best effort; the prolog's log has it)."""
    why = write_admin_comment(job_id, text, ended=False, timeout_s=0)
    if why is not None:
        log.warning("AdminComment not written: %s", why)


def _wait_held(
    client: DaemonClient, job_id: int, gpus: Sequence[int], budgets: BudgetSpec,
    timeout_s: float,
) -> str:
    """Wait until the daemon holds the job's wattage budget on every one of ``gpus``: its
    power limit (``hw``) or locked clocks (``clock``) applied, as the settings journal says; in
    ``soft`` mode, the mode chosen (the pacing reaches the ranks with their first report).
    Returns what holds it, in words.

    Raises:
        TimeoutError: Not within ``timeout_s``.
        DaemonError: The daemon refused or went away.
    """
    if budgets.watts is None:
        return "no wattage budget" + ("" if budgets.energy_wh is None
                                      else f"; energy budget {budgets.energy_wh:g} Wh")
    deadline = time.monotonic() + timeout_s
    knob = {"hw": "power_limit", "clock": "sm_clocks"}
    seen = "the daemon's first control tick"
    while True:
        view: dict[str, Any] = client.request("GET", f"/v1/jobs/{job_id}")
        mode = view.get("mode_effective")
        if mode is not None and mode not in knob:
            return f"{budgets.watts:g} W per GPU in {mode} mode ({view.get('mode_reason') or ''})"
        if mode is not None:
            settings: list[dict[str, Any]] = client.request("GET", f"/v1/jobs/{job_id}/settings")
            applied = {s["gpu"]: s["what"] for s in settings
                       if s["setting"] == knob[mode] and s["status"] == "applied"}
            missing = [g for g in gpus if g not in applied]
            if not missing:
                return f"{budgets.watts:g} W per GPU in {mode} mode: " + ", ".join(
                    f"GPU {g} {applied[g]}" for g in gpus)
            seen = f"the {knob[mode].replace('_', ' ')} on GPUs {missing}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"the daemon did not apply {seen} within {timeout_s:g} s")
        time.sleep(_POLL_S)


@slurm.command()
def epilog(
    socket: SocketOpt = None,
    timeout_s: Annotated[float, typer.Option(
        "--timeout", min=1.0, help="Seconds to wait for the job's energy to be final and for "
        "Slurm's accounting to take it.")] = 30.0,
) -> None:
    """Slurm's Epilog: end the job, undo its settings, write its GPU energy to its AdminComment."""
    _setup_logging("epilog", os.environ.get("SLURM_JOB_ID", "?"))
    try:
        settings = _settings(socket)
        job = slurm_job(os.environ)
    except SlurmEnvError as exc:
        log.error("%s", exc)
        raise typer.Exit(0) from None  # nothing of a job to undo: the node stays in service
    raise typer.Exit(_epilog(job, settings, timeout_s))


def _epilog(job: SlurmJob, settings: Settings, timeout_s: float) -> int:
    if not job.gpus:
        return 0
    state, exit_code = accounted(job.job_id)
    end_state, reason = ending(state, exit_code or controller_exit_code(job.job_id)
                               or job.exit_code)
    body = {"slurm_job": job.job_id, "state": end_state, "reason": reason}
    try:
        with DaemonClient(settings.socket_path) as client:
            try:
                view: dict[str, Any] = client.request("POST", "/v1/allocations/end", json=body)
            except DaemonError as exc:
                if str(exc).startswith("no job for Slurm job"):
                    log.info("%s (its prolog did not register it): nothing to undo", exc)
                    return 0
                raise
            left: list[dict[str, Any]] = client.request("GET", f"/v1/jobs/{view['id']}/settings")
            energy = _final_energy(client, view["id"], timeout_s)
    except DaemonError as exc:
        return _daemon_gone(job, settings, end_state, reason, exc, timeout_s)
    if left:
        log.error("job %d: settings still in force after its end: %s; the epilog fails so "
                  "that Slurm drains the node until they are undone", view["id"],
                  "; ".join(f"GPU {s['gpu']} {s['what']} ({s['status']})" for s in left))
        return 1
    _report_energy(job, view["id"], end_state, energy, timeout_s)
    return 0


def _final_energy(client: DaemonClient, job_id: int, timeout_s: float) -> dict[str, Any]:
    """The job's energy once final (samples stored past its end), else as it stands at
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        energy: dict[str, Any] = client.request("GET", f"/v1/jobs/{job_id}/energy")
        if energy["complete"] or time.monotonic() > deadline:
            return energy
        time.sleep(_POLL_S)


def _report_energy(
    job: SlurmJob, job_id: int, state: str, energy: Mapping[str, Any], timeout_s: float
) -> None:
    energy_j = float(energy["energy_j"])
    _, mistake = job_budgets(job.comment, None)
    text = _words(job=job_id, gpu_energy_j=f"{energy_j:.1f}",
                  gpu_energy_wh=f"{j_to_wh(energy_j):.4f}", gpus=energy["gpus"], state=state,
                  final="yes" if energy["complete"] else "no", error=mistake)
    why = write_admin_comment(job.job_id, text, ended=True, timeout_s=timeout_s)
    log.info("job %d %s: GPU energy %.1f J (%.3f Wh) on %d GPUs%s; AdminComment %s", job_id,
             state, energy_j, j_to_wh(energy_j), energy["gpus"],
             "" if energy["complete"] else " (not final: samples did not reach its end)",
             "written" if why is None else f"not written: {why}")


def _daemon_gone(
    job: SlurmJob, settings: Settings, state: EndState, reason: str, exc: DaemonError,
    timeout_s: float,
) -> int:
    """The daemon did not answer the epilog. If it is not running (its home is not locked),
    end the job and undo its settings here; else (it hangs) fail, so that Slurm drains the node
    while a setting of the job may still be in force."""
    try:
        done = _end_without_daemon(job, settings, state, reason)
    except _DaemonRunning:
        log.error("%s, and the daemon still holds %s: the job's settings may still be in "
                  "force; the epilog fails so that Slurm drains the node", exc, settings.home)
        return 1
    except Exception as inner:  # a store or GPU failure: the settings may still be in force
        log.error("%s; undoing the job's settings without it failed too (%s: %s); the epilog "
                  "fails so that Slurm drains the node", exc, type(inner).__name__, inner)
        return 1
    if done is None:
        log.info("%s; no job for Slurm job %d in the store: nothing to undo", exc, job.job_id)
        return 0
    job_id, energy = done
    log.warning("%s; the daemon is not running: job %d ended and its settings undone here",
                exc, job_id)
    _report_energy(job, job_id, state, energy, timeout_s)
    return 0


class _DaemonRunning(Exception):
    """The daemon's home is locked: a daemon runs there (and did not answer)."""


def _end_without_daemon(
    job: SlurmJob, settings: Settings, state: EndState, reason: str
) -> tuple[int, dict[str, Any]] | None:
    """End the job in the store and undo its settings through the settings journal, as the
    daemon would, holding the daemon's home lock so that none starts meanwhile. The job's
    id and its energy (not final: the daemon stopped sampling), or ``None`` when the store has
    no job for it."""
    import socket as socket_module
    from datetime import UTC, datetime

    from sqlalchemy import make_url

    from energy.units import mj_to_j
    from scheduler.actuators import Actuators
    from scheduler.daemon import DaemonAlreadyRunningError, home_lock
    from scheduler.jobs import TERMINAL_STATES, JobState
    from scheduler.runs import slurm_allocation_key
    from scheduler.store import JobStore, JournalStore
    from telemetry.backends.choose import open_backend
    from telemetry.store import open_store

    url = make_url(settings.db_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").exists():
        return None  # no store there: no job of the daemon's to end (and none is created)
    try:
        with home_lock(settings.home):
            store = open_store(settings.db_url)
            try:
                jobs = JobStore(store)
                record = jobs.latest_run(slurm_allocation_key(job.job_id))
                if record is None:
                    return None
                now = datetime.now(UTC)
                if record.state not in TERMINAL_STATES:
                    record = jobs.transition(record.id, JobState(state), reason, at=now)
                host = settings.node or socket_module.gethostname()
                backend, _ = open_backend(
                    settings.backend, sim_gpus=settings.sim_gpus, sim_sku=settings.sim_sku,
                    sim_state_path=settings.sim_state_path, trace=settings.trace,
                    trace_workload=settings.trace_workload,
                    trace_batch_size=settings.trace_batch_size,
                )
                try:
                    gpu_ids = {g.index: g.id for g in store.gpus() if g.host == host}
                    actuators = Actuators(backend, store, host=host, gpu_ids=gpu_ids,
                                          dry_run=settings.dry_run)
                    actuators.undo_job(record.id, f"job {record.id}: Slurm job {job.job_id} "
                                       "ended while the daemon was not running")
                    left = JournalStore(store).outstanding(host, job_id=record.id)
                finally:
                    backend.close()
                if left:
                    raise RuntimeError(f"{len(left)} settings of job {record.id} not undone")
                energy_j = mj_to_j(jobs.energy(record.id).energy_mj)
                return record.id, {"energy_j": energy_j, "gpus": len(record.gpu_ids),
                                   "complete": False}
            finally:
                store.close()
    except DaemonAlreadyRunningError:
        raise _DaemonRunning() from None
