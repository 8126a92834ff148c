"""The in-process training client: a training script registers with the powertrain daemon, reports
its progress in batches and obeys the daemon's pacing, micro-batch, pause and stop directives.

A plain loop::

    from scheduler.client import JobStopped, track

    with track(name="gpt", total_tokens=2_000_000_000, checkpoint=save_checkpoint) as job:
        for batch in loader:
            with job.step(tokens=batch.numel(), samples=batch.shape[0]):
                train_step(batch, micro_batch=job.micro_batch or default_micro_batch)

Framework callbacks call :meth:`Job.on_step` once per optimizer step instead; powertrain ships
them for Hugging Face and Lightning (``scheduler.callbacks``).

A loop that can change its micro-batch at a fixed global batch (more gradient accumulation for a
smaller one) declares which it allows, ``track(..., micro_batches=(4, 8, 16), micro_batch=16)``,
and then uses ``job.micro_batch`` at each step: the energy optimiser searches it with the power
limit. A loop that runs out of memory at a micro-batch calls ``job.out_of_memory()``: that one
and every larger one are withdrawn, and ``job.micro_batch`` falls back to the largest that fits.

The daemon is never needed for training to go on: when it is absent or dies, the client logs one
warning, keeps counting, and retries in the background. Progress is reported as cumulative totals,
so a report that was lost, or a daemon restart, loses nothing.

In a distributed run (torchrun, ``srun``, ``mpirun``) every rank calls ``track`` and reports what
it processed itself; the ranks join one job, named by the launcher's identity of the run
(``scheduler.runs``). The daemon sums their tokens and samples, and counts the steps every rank
has finished. A pause, stop or checkpoint names the step every rank obeys at, so that no rank is
left waiting in a collective.

This module does not import torch; of powertrain it imports only ``scheduler.jobs`` and
``scheduler.runs`` (standard library only), where the modes, policies, the directive's fields and
the run identities are defined once.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import platformdirs

from scheduler.jobs import Action, Directive, Mode, OnExceed
from scheduler.runs import RunIdentity, run_identity

__all__ = [
    "Directive",
    "Job",
    "JobStopped",
    "Mode",
    "OnExceed",
    "default_socket_path",
    "track",
]

log = logging.getLogger(__name__)

_BASE_URL = "http://powertrain"
_REQUEST_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
# A paused job whose daemon has been unreachable this long resumes: nobody is left to resume it.
_ORPHANED_PAUSE_S = 60.0
# Directives beyond these bounds are a daemon bug; clamping keeps a training loop from hanging.
_MAX_PACE_S = 60.0
_MAX_SLOWDOWN = 100.0
_MIN_DUTY = 0.01  # a directive below this would leave the loop all but stopped
_ACTIONS = frozenset(a.value for a in Action)

_E = TypeVar("_E", Mode, OnExceed)


class JobStopped(SystemExit):
    """The daemon stopped this job (for example, its energy budget ran out).

    Raised from the step hook after the checkpoint hook has run. It subclasses :class:`SystemExit`
    so that a training loop's ``except Exception`` does not swallow it and an uncaught one ends
    the script with its message and exit status 1, without a traceback.

    Attributes:
        job_id: The daemon's id of the stopped job.
    """

    def __init__(self, job_id: int | None, state: str | None) -> None:
        self.job_id = job_id
        super().__init__(
            f"powertrain: job {job_id} stopped by the daemon (state {state!r}); "
            "the checkpoint hook has run"
        )


def default_socket_path() -> Path:
    """The daemon's Unix socket: ``$POWERTRAIN_SOCKET``, else ``<home>/powertrain.sock``.

    ``<home>`` is ``$POWERTRAIN_HOME``, else the per-user data folder, as in the daemon's settings.
    """
    explicit = os.environ.get("POWERTRAIN_SOCKET")
    if explicit:
        return Path(explicit)
    home = os.environ.get("POWERTRAIN_HOME") or platformdirs.user_data_dir(
        "powertrain", appauthor=False
    )
    return Path(home) / "powertrain.sock"


def _visible_gpu_ids(run: RunIdentity | None = None) -> list[int] | None:
    """GPU indices from ``CUDA_VISIBLE_DEVICES`` when it is a list of integers, else ``None``.

    A rank of a run whose node's ranks share the list, one GPU each (as many GPUs as local
    ranks: torchrun's and ``mpirun``'s usual layout), uses the one at its local rank. Inside a
    Slurm job, whose list Slurm numbers from 0 when it confines the job to its GPUs, the node's
    own indices of the same GPUs (``SLURM_STEP_GPUS``, else ``SLURM_JOB_GPUS``) stand for it.
    """
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not raw or not raw.strip():
        return None
    try:
        visible = [int(part) for part in raw.split(",")]
    except ValueError:  # UUIDs or MIG names: the daemon finds the GPUs from the pid instead
        return None
    slurm = os.environ.get("SLURM_STEP_GPUS") or os.environ.get("SLURM_JOB_GPUS") or ""
    try:
        node_indices = [int(part) for part in slurm.split(",")] if slurm.strip() else []
    except ValueError:
        node_indices = []
    if len(node_indices) == len(visible):  # the same GPUs (a narrower list is the script's)
        visible = node_indices
    local_world = next(
        (os.environ[name] for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                        "MPI_LOCALNRANKS") if os.environ.get(name)), None,
    )
    if run is not None and local_world == str(len(visible)) and run.local_rank < len(visible):
        return [visible[run.local_rank]]
    return visible


def _run_of_this_process() -> RunIdentity | None:
    try:
        return run_identity(os.environ)
    except ValueError as exc:
        log.warning("powertrain: %s; reporting as a process of its own", exc)
        return None


def _launched_job_id() -> int | None:
    raw = os.environ.get("POWERTRAIN_JOB_ID")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        log.warning("powertrain: ignoring POWERTRAIN_JOB_ID=%r (not an integer); attaching", raw)
        return None


def _finite(value: Any, default: float, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    number = float(value)
    if not math.isfinite(number):
        return default
    return min(max(number, low), high)


def _member(kind: type[_E], value: _E | str, what: str) -> _E:
    """``value`` as a member of ``kind``, or a ``ValueError`` that lists the allowed names."""
    try:
        return kind(value)
    except ValueError:
        names = tuple(m.value for m in kind)
        raise ValueError(f"{what} must be one of {names}, not {value!r}") from None


def _parse_directive(data: Any) -> Directive:
    """A :class:`Directive` from a progress answer; malformed fields fall back to neutral values."""
    if not isinstance(data, dict):
        return Directive()
    micro_batch = data.get("micro_batch")
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        micro_batch = None
    state = data.get("state")
    action = data.get("action")
    at_step = data.get("at_step")
    if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 0:
        at_step = None
    return Directive(
        pace_s=_finite(data.get("pace_s"), 0.0, 0.0, _MAX_PACE_S),
        duty=_finite(data.get("duty"), 1.0, _MIN_DUTY, 1.0),
        micro_batch=micro_batch,
        slowdown=_finite(data.get("slowdown"), 1.0, 1.0, _MAX_SLOWDOWN),
        state=state if isinstance(state, str) else None,
        action=Action(action) if isinstance(action, str) and action in _ACTIONS else None,
        at_step=at_step,
    )


def _micro_batches(
    allowed: Sequence[int] | None, own: int | None
) -> tuple[tuple[int, ...], int | None]:
    """The declared micro-batches, ascending, and the loop's own one (checked)."""
    if allowed is None:
        if own is not None:
            raise ValueError("micro_batch is the loop's own among micro_batches: declare those")
        return (), None
    values = sorted(set(allowed))
    if not values or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in values):
        raise ValueError(f"micro_batches must be positive integers, got {list(allowed)!r}")
    if own is None:
        own = values[-1]
    if own not in values:
        raise ValueError(f"micro_batch {own!r} is not one of micro_batches {values}")
    return tuple(values), own


def _detail(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("detail"), str):
        return f"HTTP {response.status_code}: {data['detail']}"
    return f"HTTP {response.status_code}"


class _Step:
    """The context manager :meth:`Job.step` returns; one instance per job, reused every step.

    Attributes:
        tokens: Tokens this step processes (may be set inside the ``with`` block).
        samples: Samples this step processes (may be set inside the ``with`` block).
    """

    __slots__ = ("_job", "_t0", "samples", "tokens")

    def __init__(self, job: Job) -> None:
        self._job = job
        self._t0 = 0.0
        self.tokens = 0
        self.samples = 0

    def __enter__(self) -> _Step:
        self._t0 = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        duration_s = time.perf_counter() - self._t0
        if exc_type is None:  # a step that raised did not happen
            self._job._record(duration_s, self.tokens, self.samples, self._t0)


class Job:
    """One training job as seen from inside the training process.

    Use it as a context manager (``with track(...) as job``) or call :meth:`start` and
    :meth:`close`. Progress goes to the daemon from a background thread about once every
    ``report_interval_s``; the step hook only counts and applies the last directive.

    Thread safety: the training thread is the only writer of the progress counters and publishes
    them as one tuple (``_totals``); the reporter thread is the only writer of ``_directive`` (a
    frozen :class:`Directive`). Each side reads the other's value with one attribute load, and
    storing or loading an object reference is atomic in CPython (under the GIL, and under
    per-object locking in free-threaded builds), so each side always sees a complete, consistent
    snapshot without a lock, and no update is lost because each value has a single writer. No
    lock is ever held across I/O; the step hook itself takes none.

    Args:
        name: Job name shown by the daemon; defaults to the script's file name.
        total_steps: Planned optimizer steps, if known (progress and energy forecasts).
        total_tokens: Planned tokens, if known.
        watts: Wattage budget for the job's GPUs, in W.
        energy_wh: Energy budget for the whole job, in Wh.
        mode: How the wattage budget is held: ``auto``, ``hw``, ``clock`` or ``soft``.
        on_exceed: What the daemon does when the energy forecast exceeds the budget.
        gpu_ids: GPU indices the job uses; default from ``CUDA_VISIBLE_DEVICES``.
        checkpoint: Called on the training thread before the job pauses or stops.
        socket_path: The daemon's socket; default :func:`default_socket_path`.
        report_interval_s: Seconds between progress reports (and retries when unreachable).
        final_timeout_s: Time allowed for the final report when the job ends.
        enabled: ``False`` counts steps locally and never contacts the daemon.
        initial_steps: Steps already done when this process starts (resuming from a checkpoint
            under the same job), so the cumulative totals continue.
        initial_samples: Samples already done, likewise.
        initial_tokens: Tokens already done, likewise.
        micro_batches: The micro-batches the loop can train in at its global batch (divisors of
            it that fit its memory); declaring them makes the micro-batch a lever of the daemon
            (:attr:`micro_batch`). ``None``: the loop's micro-batch is its own business.
        micro_batch: The loop's own micro-batch, one of ``micro_batches`` (default: the
            largest of them).

    Raises:
        ValueError: ``mode`` or ``on_exceed`` is not one of the allowed values, an interval is
            not positive, or the micro-batches are not positive integers that include
            ``micro_batch``.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        total_steps: int | None = None,
        total_tokens: int | None = None,
        watts: float | None = None,
        energy_wh: float | None = None,
        mode: Mode | str = Mode.AUTO,
        on_exceed: OnExceed | str = OnExceed.WARN,
        gpu_ids: list[int] | None = None,
        checkpoint: Callable[[], object] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        report_interval_s: float = 1.0,
        final_timeout_s: float = 2.0,
        enabled: bool = True,
        initial_steps: int = 0,
        initial_samples: int = 0,
        initial_tokens: int = 0,
        micro_batches: Sequence[int] | None = None,
        micro_batch: int | None = None,
    ) -> None:
        self._mode = _member(Mode, mode, "mode")
        self._on_exceed = _member(OnExceed, on_exceed, "on_exceed")
        if not report_interval_s > 0 or not final_timeout_s > 0:
            raise ValueError("report_interval_s and final_timeout_s must be positive")
        self.name = name or Path(sys.argv[0] or "python").name or "python"
        self.total_steps = total_steps
        self.total_tokens = total_tokens
        self._watts = watts
        self._energy_wh = energy_wh
        self._gpu_ids = gpu_ids
        self._checkpoint = checkpoint
        self._socket_path = Path(socket_path) if socket_path is not None else None
        self._interval_s = report_interval_s
        self._final_timeout_s = final_timeout_s
        self._enabled = enabled
        self._initial_tokens = initial_tokens
        # The micro-batches still allowed (``out_of_memory`` withdraws some) and the loop's own:
        # written by the training thread, read by the reporter as one tuple each.
        self._micro_batches, self._own_micro_batch = _micro_batches(micro_batches, micro_batch)

        # Written by the training thread only: (steps, samples, tokens, step seconds).
        self._totals: tuple[int, int, int, float] = (
            initial_steps,
            initial_samples,
            initial_tokens,
            0.0,
        )
        self._step = _Step(self)
        self._t_first: float | None = None
        self._paused_s = 0.0
        self._mark = 0.0  # end of the last on_step call, after its sleeps

        # Written by the reporter thread (and by start/close before/after it runs).
        self._directive = Directive()
        self._id: int | None = None
        self._member: int | None = None
        self._joined = False  # the daemon took this process as a member of job ``_id``
        self._launched_id: int | None = None
        self._outcome = "ok"
        self._run: RunIdentity | None = None
        self._refused = False  # the daemon refused this process as a member: stop trying
        self._launched = False
        self._healthy: bool | None = None  # None: never tried; False: warned about this outage
        self._last_ok = 0.0
        self._sent: tuple[int, int, int, float] = self._totals
        self._updated = threading.Event()

        self._http: httpx.Client | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._started = False
        self._closed = False
        self._checkpointed_at: int | None = None  # the held step this loop checkpointed at

    # -- public read-only view -------------------------------------------------------------

    @property
    def id(self) -> int | None:
        """The daemon's job id; ``None`` until attached (or when the daemon is unreachable)."""
        return self._id

    @property
    def directive(self) -> Directive:
        """The daemon's latest directive."""
        return self._directive

    @property
    def state(self) -> str | None:
        """The job's state as the daemon last reported it."""
        return self._directive.state

    @property
    def pace_s(self) -> float:
        """Seconds slept after each step to hold a soft power budget."""
        return self._directive.pace_s

    @property
    def slowdown(self) -> float:
        """Step-time stretch factor of a simulated GPU (1.0 on real GPUs)."""
        return self._directive.slowdown

    @property
    def micro_batch(self) -> int | None:
        """The micro-batch size to train in now, or ``None`` to keep the loop's own.

        The daemon's directive; with declared ``micro_batches``, never one of those
        :meth:`out_of_memory` withdrew (the largest that fits instead), and the loop's own
        micro-batch when the daemon asks for none.
        """
        asked = self._directive.micro_batch
        allowed = self._micro_batches
        if not allowed:
            return asked
        want = asked if asked is not None else self._own_micro_batch
        return want if want is not None and want <= allowed[-1] else allowed[-1]

    @property
    def micro_batches(self) -> tuple[int, ...]:
        """The micro-batches declared and not withdrawn, ascending (empty: none declared)."""
        return self._micro_batches

    def out_of_memory(self) -> int:
        """The loop ran out of memory at :attr:`micro_batch`: withdraw it and every larger one.

        The daemon learns of it at the next report (its optimiser goes no higher); the loop goes
        on at the returned micro-batch, the largest that is left.

        Returns:
            The micro-batch to train in from now on.

        Raises:
            ValueError: No micro-batches were declared, or the one that failed was the smallest.
        """
        failed = self.micro_batch
        left = tuple(m for m in self._micro_batches if failed is None or m < failed)
        if not self._micro_batches or not left:
            raise ValueError(
                f"micro-batch {failed} ran out of memory and no smaller one is declared "
                f"(micro_batches: {list(self._micro_batches)})"
            )
        self._micro_batches = left
        log.warning("powertrain: micro-batch %s ran out of memory; training on at %d",
                    failed, left[-1])
        return left[-1]

    @property
    def connected(self) -> bool:
        """Whether the last exchange with the daemon succeeded."""
        return self._healthy is True

    @property
    def steps(self) -> int:
        """Cumulative steps (including ``initial_steps``)."""
        return self._totals[0]

    @property
    def samples(self) -> int:
        """Cumulative samples (including ``initial_samples``)."""
        return self._totals[1]

    @property
    def tokens(self) -> int:
        """Cumulative tokens (including ``initial_tokens``)."""
        return self._totals[2]

    @property
    def tokens_per_s(self) -> float:
        """This process's throughput in tokens per wall second since its first step began.

        Pacing and stretch sleeps count (they are real time the job takes); pauses do not.
        """
        if self._t_first is None:
            return 0.0
        elapsed_s = time.perf_counter() - self._t_first - self._paused_s
        tokens = self._totals[2] - self._initial_tokens
        return tokens / elapsed_s if elapsed_s > 0 else 0.0

    # -- the hot path (training thread) --------------------------------------------------------

    def step(self, tokens: int = 0, samples: int = 0) -> _Step:
        """Time one optimizer step: ``with job.step(tokens=n, samples=b): ...``.

        The step counts when the block ends without an exception; then the daemon's pace and
        slowdown sleeps run, and a pause or stop directive is obeyed. The returned object is
        reused every step (steps do not nest); its ``tokens`` and ``samples`` may be set inside
        the block when they are only known there.

        Args:
            tokens: Tokens the step processes (the global batch, all micro-batches).
            samples: Samples (sequences) the step processes.

        Raises:
            JobStopped: On leaving the block, when the daemon stopped the job.
        """
        step = self._step
        step.tokens = tokens
        step.samples = samples
        return step

    def on_step(self, tokens: int = 0, samples: int = 0, step_time_s: float | None = None) -> None:
        """Record one finished optimizer step from a framework callback.

        Without ``step_time_s`` the step's time is the wall time since the previous call (or since
        :meth:`start`), not counting this client's own sleeps. Call it once per optimizer step,
        with the tokens and samples of all its micro-batches, between :meth:`start` and
        :meth:`close`. The Hugging Face and Lightning callbacks that do this are shipped:
        ``scheduler.callbacks.hf`` and ``scheduler.callbacks.lightning`` (the ``hf`` and
        ``lightning`` extras).

        Args:
            tokens: Tokens the step processed.
            samples: Samples the step processed.
            step_time_s: The step's own duration in seconds, when the caller measured it.

        Raises:
            JobStopped: When the daemon stopped the job.
        """
        now = time.perf_counter()
        duration_s = step_time_s if step_time_s is not None else now - self._mark
        self._record(duration_s, tokens, samples, now - duration_s)
        self._mark = time.perf_counter()

    def _record(self, duration_s: float, tokens: int, samples: int, began: float) -> None:
        """Count a finished step, then apply the directive: the training thread's only work."""
        if self._t_first is None:
            self._t_first = began
        directive = self._directive
        stretch_s = duration_s * (directive.slowdown - 1.0)
        steps, samples0, tokens0, busy_s = self._totals
        # The reported step time includes the stretch: it stands for the simulated GPU's slower
        # step. Pace sleeps are not part of the step.
        self._totals = (
            steps + 1,
            samples0 + samples,
            tokens0 + tokens,
            busy_s + duration_s + stretch_s,
        )
        sleep_s = stretch_s + directive.pace_s
        if directive.duty < 1.0:
            sleep_s += (duration_s + stretch_s) * (1.0 / directive.duty - 1.0)
        if sleep_s > 0.0:
            time.sleep(sleep_s)
        if directive.action is not None and (
            directive.at_step is None or steps + 1 >= directive.at_step
        ):
            self._obey(directive)

    def _obey(self, directive: Directive) -> None:
        """Checkpoint, then stop, go on, or wait until the daemon lets the job run again.

        A held step (``at_step``) is the same on every rank, so every rank obeys at the same
        step boundary."""
        if directive.action == "checkpoint":
            if self._checkpointed_at != directive.at_step:
                self._checkpointed_at = directive.at_step
                log.info("powertrain: job %s checkpointing at step %s", self._id, self.steps)
                self._call_checkpoint()
            return
        if directive.action == "stop":
            self._call_checkpoint()
            raise JobStopped(self._id, directive.state)
        log.info("powertrain: job %s paused by the daemon; checkpointing", self._id)
        self._call_checkpoint()
        t0 = time.perf_counter()
        try:
            while True:
                self._updated.wait(self._interval_s)
                self._updated.clear()
                current = self._directive
                if current.action == "stop":
                    raise JobStopped(self._id, current.state)  # already checkpointed
                if current.action is None and current.state == "running":
                    log.info("powertrain: job %s resumed", self._id)
                    return
                if self._healthy is False and time.monotonic() - self._last_ok > _ORPHANED_PAUSE_S:
                    log.warning(
                        "powertrain: daemon unreachable for %.0f s while job %s was "
                        "paused; resuming",
                        _ORPHANED_PAUSE_S,
                        self._id,
                    )
                    self._directive = Directive()
                    return
        finally:
            self._paused_s += time.perf_counter() - t0

    def _call_checkpoint(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Job:
        """Register with the daemon (or adopt ``POWERTRAIN_JOB_ID``), fetch the first directive
        and start the reporter thread. Never raises for an absent daemon.

        Returns:
            The job itself.
        """
        if self._started:
            return self
        self._started = True
        self._mark = time.perf_counter()
        if not self._enabled:
            return self
        path = self._socket_path or default_socket_path()
        self._socket_path = path
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(path)),
            base_url=_BASE_URL,
            timeout=_REQUEST_TIMEOUT,
        )
        launched = _launched_job_id()
        if launched is not None:
            self._id = self._launched_id = launched
            self._launched = True
        self._run = _run_of_this_process()
        # One synchronous exchange, so a micro-batch directive is known before the first step.
        self._exchange(final=False, timeout=self._final_timeout_s)
        self._thread = threading.Thread(
            target=self._report_loop, name="powertrain-reporter", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)
        return self

    def close(self, outcome: str = "ok") -> None:
        """Stop the reporter and send the final report (``final: true``), within
        ``final_timeout_s``. Runs however the job ends (also on an exception or
        :class:`JobStopped`): ``final`` says no more reports come from this process, and
        ``outcome`` how it ended (``ok``, ``error`` or ``stopped``: ``with track(...)`` says
        which). Idempotent."""
        if self._closed or not self._started:
            return
        self._outcome = outcome
        self._closed = True
        atexit.unregister(self.close)
        if self._http is None:
            return
        self._closing.set()
        if self._thread is not None:
            self._thread.join(self._final_timeout_s)
        try:
            self._exchange(final=True, timeout=self._final_timeout_s)
        finally:
            self._http.close()

    def __enter__(self) -> Job:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close("ok")
        elif issubclass(exc_type, JobStopped):
            self.close("stopped")
        else:
            self.close("error")

    # -- the reporter (background thread) ------------------------------------------------------

    def _report_loop(self) -> None:
        while not self._closing.wait(self._interval_s):
            try:
                self._exchange(final=False, timeout=_REQUEST_TIMEOUT)
            except Exception:  # a bug here must not end reporting for good, nor training
                log.exception("powertrain: progress report failed")

    def _exchange(self, *, final: bool, timeout: float | httpx.Timeout) -> None:
        """Attach if needed, then report the cumulative totals and take the directive."""
        if self._refused or (not self._joined and not self._attach(timeout)):
            return
        self._report(final=final, timeout=timeout)

    def _attach(self, timeout: float | httpx.Timeout) -> bool:
        assert self._http is not None
        run = self._run
        body = {
            "name": self.name,
            "pid": os.getpid(),
            "gpu_ids": self._gpu_ids if self._gpu_ids is not None else _visible_gpu_ids(run),
            "total_steps": self.total_steps,
            "total_tokens": self.total_tokens,
            "watts": self._watts,
            "energy_wh": self._energy_wh,
            "mode": self._mode,
            "on_exceed": self._on_exceed,
            "job_id": self._launched_id if self._launched else None,
        }
        if run is not None:
            body.update(run_key=None if self._launched else run.key, rank=run.rank,
                        local_rank=run.local_rank, world_size=run.world_size,
                        generation=run.generation)
        try:
            response = self._http.post("/v1/jobs/attach", json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            self._unreachable(exc)
            return False
        if response.status_code in (400, 403, 409, 422):  # this process will not fit: say why
            self._refused = True
            log.error("powertrain: the daemon refused this process (%s); training continues "
                      "untracked", _detail(response))
            return False
        if response.status_code != 201:
            self._unreachable(_detail(response))
            return False
        try:
            data = response.json()
            job_id = data["id"]
            if not isinstance(job_id, int):
                raise TypeError(f"id is {job_id!r}")
        except (ValueError, KeyError, TypeError) as exc:
            self._unreachable(f"unexpected attach answer ({exc})")
            return False
        self._id = job_id
        self._joined = True
        member = data.get("member_id")
        self._member = member if isinstance(member, int) else None
        state = data.get("state")
        self._directive = Directive(state=state if isinstance(state, str) else None)
        log.info("powertrain: attached as job %d", job_id)
        return True

    def _report(self, *, final: bool, timeout: float | httpx.Timeout) -> None:
        assert self._http is not None
        totals = self._totals  # one load: a consistent snapshot (see the class docstring)
        steps, samples, tokens, busy_s = totals
        new_steps = steps - self._sent[0]
        body: dict[str, object] = {
            "steps": steps,
            "samples": samples,
            "tokens": tokens,
            "step_time_s": (busy_s - self._sent[3]) / new_steps if new_steps > 0 else None,
            "total_steps": self.total_steps,
            "total_tokens": self.total_tokens,
            "final": final,
            "member": self._member,
            "outcome": self._outcome if final else None,
        }
        if self._micro_batches:
            body["micro_batches"] = list(self._micro_batches)
            body["micro_batch_default"] = self._own_micro_batch
        try:
            response = self._http.post(f"/v1/jobs/{self._id}/progress", json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            self._unreachable(exc)
            return
        if response.status_code == 404 and not self._launched:
            # The daemon no longer knows this job (its store was reset): attach again; the
            # cumulative totals then bring the new job up to date.
            self._unreachable(_detail(response))
            self._id = self._member = None
            self._joined = False
            return
        if response.status_code != 200:
            self._unreachable(_detail(response))
            return
        try:
            data = response.json()
        except ValueError:
            self._unreachable("progress answer is not JSON")
            return
        # Only a delivered report moves the baseline, so step_time_s then spans every step since.
        self._sent = totals
        self._directive = _parse_directive(data)
        self._reachable()
        self._updated.set()

    def _unreachable(self, reason: object) -> None:
        """Warn once per outage; training goes on and reports retry every interval."""
        if self._healthy is not False:
            log.warning(
                "powertrain: daemon at %s unreachable (%s); training continues untracked and "
                "reports resume when it is back",
                self._socket_path,
                reason,
            )
            self._healthy = False
        else:
            log.debug("powertrain: daemon still unreachable (%s)", reason)

    def _reachable(self) -> None:
        if self._healthy is False:
            log.info("powertrain: daemon reachable again; job %s reported", self._id)
        self._healthy = True
        self._last_ok = time.monotonic()


def track(
    name: str | None = None,
    *,
    total_steps: int | None = None,
    total_tokens: int | None = None,
    watts: float | None = None,
    energy_wh: float | None = None,
    mode: Mode | str = Mode.AUTO,
    on_exceed: OnExceed | str = OnExceed.WARN,
    gpu_ids: list[int] | None = None,
    checkpoint: Callable[[], object] | None = None,
    socket_path: str | os.PathLike[str] | None = None,
    report_interval_s: float = 1.0,
    final_timeout_s: float = 2.0,
    enabled: bool = True,
    initial_steps: int = 0,
    initial_samples: int = 0,
    initial_tokens: int = 0,
    micro_batches: Sequence[int] | None = None,
    micro_batch: int | None = None,
) -> Job:
    """A :class:`Job` for this training process, to use as ``with track(...) as job:``.

    See :class:`Job` for the arguments.

    Returns:
        The (not yet started) job; entering it registers with the daemon.
    """
    return Job(
        name,
        total_steps=total_steps,
        total_tokens=total_tokens,
        watts=watts,
        energy_wh=energy_wh,
        mode=mode,
        on_exceed=on_exceed,
        gpu_ids=gpu_ids,
        checkpoint=checkpoint,
        socket_path=socket_path,
        report_interval_s=report_interval_s,
        final_timeout_s=final_timeout_s,
        enabled=enabled,
        initial_steps=initial_steps,
        initial_samples=initial_samples,
        initial_tokens=initial_tokens,
        micro_batches=micro_batches,
        micro_batch=micro_batch,
    )
