"""Framework callbacks: the training client inside a Hugging Face or a Lightning ``Trainer``.

::

    # pip install 'powertrain[hf]'
    from scheduler.callbacks.hf import PowertrainCallback
    trainer = transformers.Trainer(model, args, train_dataset=data,
                                   callbacks=[PowertrainCallback(name="gpt")])

    # pip install 'powertrain[lightning]'
    from scheduler.callbacks.lightning import PowertrainCallback
    trainer = lightning.pytorch.Trainer(callbacks=[PowertrainCallback(name="gpt")])

Both callbacks work the same way:

- The job starts when training starts and ends when it ends (``ok``, ``stopped`` when the daemon
  stopped it, ``error`` when training raised or the process exits in the middle of training). The
  keyword arguments are :func:`scheduler.client.track`'s (``name``, ``watts``, ``energy_wh``,
  ``on_exceed``, ``socket_path``, ...); ``total_steps`` and ``initial_steps`` default to the
  framework's planned and already-done optimizer steps (a resumed run goes on counting).
- A step is an optimizer step. With gradient accumulation the micro-batches are counted as they
  are trained and reported together, as one step, when the optimizer step that ends them is done.
- Every rank reports what it processed itself, from the batches it trained: ``tokens="all"``
  counts the elements of the batch's main input (``input_keys``'s first key present, by default
  ``input_ids``; padding included: it was computed on); ``"non_padding"`` sums the batch's
  ``attention_mask`` instead (where it has none, all tokens count). The sum is kept on the batch's
  device and read once per optimizer step, so it costs one device synchronisation a step.
  Samples are the main input's first dimension. Either may be a function of the batch instead.
- Directives are obeyed at the step boundary, through the framework's own checkpointing (see each
  callback). A stop ends training the framework's way, not by the client's
  :class:`~scheduler.client.JobStopped` (a ``SystemExit``) escaping from the hook: that would
  unwind through the framework's loop and skip its own ending (the other callbacks'
  ``on_train_end``, loggers, DDP teardown). The callback catches it and asks the framework to
  save and stop instead; the loop ends after the checkpoint, the end-of-training hooks run,
  ``train()``/``fit()`` returns, and the job ends ``stopped`` (or ``cancelled``) in the daemon
  from the final report. The callback's ``stopped`` says so: what the script does after
  ``train()``/``fit()`` (a final evaluation, saving the model, its exit status) is its own.

This package imports neither framework: ``scheduler.callbacks.hf`` imports transformers and
``scheduler.callbacks.lightning`` imports lightning, and nothing else in powertrain imports this
package (import-linter contracts in ``pyproject.toml`` hold both), so the daemon never needs them.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeAlias

from scheduler.client import Job, JobStopped, track

__all__ = ["BatchCounter", "RunView", "TokenCount", "TrackedRun"]

log = logging.getLogger(__name__)

TokenCount: TypeAlias = Literal["all", "non_padding"] | Callable[[Any], int]
"""How a callback counts a batch's tokens: ``"all"``, ``"non_padding"``, or a function of it."""

_TOKEN_MODES = ("all", "non_padding")


class BatchCounter:
    """Tokens and samples of the micro-batches trained since the last optimizer step.

    Tensors are used through their methods only (``numel``, ``sum``, ``shape``), so this module
    needs no torch.

    Args:
        tokens: ``"all"``, ``"non_padding"`` or a function of the batch (see the package).
        samples: A function of the batch, or ``None`` for the main input's first dimension.
        input_keys: The keys of a dict-like batch's main input, the first one present counts.

    Raises:
        ValueError: ``tokens`` is none of the allowed values, or ``input_keys`` is empty.
    """

    def __init__(
        self,
        tokens: TokenCount = "all",
        samples: Callable[[Any], int] | None = None,
        input_keys: Iterable[str] = ("input_ids",),
    ) -> None:
        if not callable(tokens) and tokens not in _TOKEN_MODES:
            raise ValueError(f"tokens must be one of {_TOKEN_MODES} or a function, not {tokens!r}")
        self._tokens_of = tokens
        self._samples_of = samples
        self._keys = (input_keys,) if isinstance(input_keys, str) else tuple(input_keys)
        if not self._keys:
            raise ValueError("input_keys names no key")
        self._tokens: Any = 0  # an int, or a tensor sum kept on the batch's device
        self._samples = 0
        self._warned = False

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of the main input, in the order they are looked for."""
        return self._keys

    def add(self, batch: Any) -> None:
        """Count one micro-batch: a mapping (its main input), a tensor (itself), or a tuple or
        list (its first element, looked into the same way)."""
        main = self._main_input(batch)
        counted_by_functions = callable(self._tokens_of) and self._samples_of is not None
        if main is None and not counted_by_functions and not self._warned:
            self._warned = True
            log.warning("powertrain: found no %s in a batch of type %s; its tokens and "
                            "samples count as 0 (pass tokens= and samples= functions)",
                            " or ".join(self._keys), type(batch).__name__)
        if callable(self._tokens_of):
            self._tokens += int(self._tokens_of(batch))
        elif main is not None:
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            if self._tokens_of == "non_padding" and mask is not None:
                self._tokens = self._tokens + mask.sum()
            else:
                self._tokens += int(main.numel())
        if self._samples_of is not None:
            self._samples += int(self._samples_of(batch))
        elif main is not None:
            shape = tuple(main.shape)
            self._samples += shape[0] if shape else 1

    def take(self) -> tuple[int, int]:
        """``(tokens, samples)`` counted since the last call; counting starts over."""
        counted = int(self._tokens), self._samples
        self._tokens, self._samples = 0, 0
        return counted

    def _main_input(self, batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return next((batch[k] for k in self._keys if batch.get(k) is not None), None)
        if isinstance(batch, list | tuple):
            return self._main_input(batch[0]) if batch else None
        return batch if hasattr(batch, "numel") and hasattr(batch, "shape") else None


class TrackedRun:
    """The job of one training run of one rank, as a framework callback drives it.

    Args:
        track_options: :func:`scheduler.client.track`'s keyword arguments, except
            ``checkpoint`` (the callback checkpoints through its framework).

    Raises:
        TypeError: ``checkpoint`` was given.
    """

    def __init__(self, track_options: Mapping[str, Any]) -> None:
        if "checkpoint" in track_options:
            raise TypeError("a framework callback checkpoints through its framework: "
                            "checkpoint= is not an option")
        self._options = dict(track_options)
        self.job: Job | None = None
        self.stopped = False
        self._mark = 0.0

    def start(
        self, checkpoint: Callable[[], object], *, total_steps: int | None, initial_steps: int
    ) -> Job:
        """Start a new job (registering with the daemon); options given to the callback take
        precedence over the framework's ``total_steps`` and ``initial_steps``."""
        self.close()  # a callback used for a second ``train()`` starts a second job
        options = {"total_steps": total_steps, "initial_steps": initial_steps} | self._options
        self.job = track(checkpoint=checkpoint, **options).start()
        self.stopped = False
        # LIFO: this runs before the client's own handler, which would say the job ended well.
        atexit.register(self._at_exit)
        self._mark = time.perf_counter()
        return self.job

    def elapsed_s(self) -> float:
        """Seconds since the last step was reported (or since the start), the client's sleeps
        and pauses excluded: the step's time."""
        return time.perf_counter() - self._mark

    def report(self, tokens: int, samples: int, step_time_s: float) -> bool:
        """Report one optimizer step and obey the directive (pace, pause, checkpoint, stop).

        Returns:
            Whether the daemon stopped the job: the checkpoint hook has run, and training
            should end.
        """
        if self.job is None:
            return self.stopped
        try:
            self.job.on_step(tokens=tokens, samples=samples, step_time_s=step_time_s)
        except JobStopped as stop:
            self.stopped = True
            log.warning("%s; ending training", stop.code)
        finally:
            self._mark = time.perf_counter()
        return self.stopped

    def close(self, outcome: str | None = None) -> None:
        """End the job: ``outcome`` defaults to ``stopped`` or ``ok``. Idempotent."""
        job, self.job = self.job, None
        if job is None:
            return
        atexit.unregister(self._at_exit)
        job.close(outcome or ("stopped" if self.stopped else "ok"))

    def _at_exit(self) -> None:
        """The process ends while training runs: the training raised (a framework calls no
        callback then) or was ended in the middle."""
        self.close("error")


class RunView:
    """What a framework callback shows of its run: ``job`` and ``stopped`` (a mixin; the
    callback keeps its ``TrackedRun`` as ``_run``)."""

    _run: TrackedRun

    @property
    def job(self) -> Job | None:
        """This rank's job while training runs (its id, totals and directive)."""
        return self._run.job

    @property
    def stopped(self) -> bool:
        """Whether the daemon stopped the last training run (after its checkpoint)."""
        return self._run.stopped
