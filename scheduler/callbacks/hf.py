"""The Hugging Face ``Trainer`` callback: ``pip install 'powertrain[hf]'``, then::

    from scheduler.callbacks.hf import PowertrainCallback

    trainer = Trainer(model, args, train_dataset=data, callbacks=[PowertrainCallback(name="gpt")])
    trainer.train()

See :mod:`scheduler.callbacks` for what every framework callback does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from scheduler.callbacks import BatchCounter, RunView, TokenCount, TrackedRun
from scheduler.jobs import Action

__all__ = ["PowertrainCallback"]


class PowertrainCallback(RunView, TrainerCallback):
    """Reports a ``transformers.Trainer``'s optimizer steps, tokens and samples to powertrain, and
    obeys the daemon's directives through the Trainer's own checkpoints.

    Counting: the Trainer hands its callbacks no batch, so the callback counts what the model is
    given: a forward pre-hook on the model (registered when training begins, removed when it ends)
    counts every micro-batch the model trains on (in training mode: evaluation is not counted),
    and ``on_step_end``, which the Trainer calls once per optimizer step, reports their sum. The
    "batch" is the keyword arguments of the model's call (``input_ids``, ``attention_mask``, ...:
    the Trainer calls ``model(**inputs)``), a positional first argument as ``input_ids``. A
    Trainer that calls the model more than once per micro-batch (some RLHF trainers) has every
    call counted.

    Directives, at the end of an optimizer step (the Trainer saves with ``control.should_save``
    and ends with ``control.should_training_stop``, both right after ``on_step_end``):

    - checkpoint: ``should_save``; the Trainer writes ``checkpoint-<step>`` under ``output_dir``
      and goes on.
    - stop: ``should_save`` and ``should_training_stop``: the Trainer writes its checkpoint, ends
      its loop and its ``on_train_end`` hooks, and ``train()`` returns; ``stopped`` is then true.
    - pause: a callback cannot save by itself (it is handed no ``Trainer``), and a pause must not
      wait before the checkpoint is written: the step is reported from ``on_save`` instead, which
      the Trainer calls once the checkpoint it was asked for is on disk, and the callback waits
      there until the daemon resumes (or stops: then training ends, already checkpointed). The
      rare pause the client learns of only while the step is being reported waits in
      ``on_step_end``, and its checkpoint is written when it is resumed or stopped.

    Args:
        tokens: ``"all"`` (the main input's elements), ``"non_padding"`` (the attention mask's
            sum) or a function of the batch.
        samples: A function of the batch; by default the main input's first dimension.
        input_keys: The model's main input, the first of these keys present in a batch.
        **track_options: :func:`scheduler.client.track`'s arguments (``name``, ``watts``,
            ``energy_wh``, ``on_exceed``, ``socket_path``, ...), but not ``checkpoint``.
            ``total_steps`` defaults to the Trainer's ``max_steps`` and ``initial_steps`` to the
            steps it resumed at.

    Raises:
        TypeError: ``checkpoint`` is among the options.
        ValueError: ``tokens`` is none of the allowed values, or ``input_keys`` is empty.
    """

    def __init__(
        self,
        *,
        tokens: TokenCount = "all",
        samples: Callable[[Any], int] | None = None,
        input_keys: Iterable[str] = ("input_ids",),
        **track_options: Any,
    ) -> None:
        self._counter = BatchCounter(tokens, samples, input_keys)
        self._main_key = self._counter.keys[0]
        self._run = TrackedRun(track_options)
        self._hook: Any = None
        self._control: TrainerControl | None = None  # the one the checkpoint hook asks to save
        self._deferred: tuple[int, int, float] | None = None  # a step whose pause waits on_save

    # -- the Trainer's events --------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        self._deferred = None
        self._counter.take()
        self._run.start(self._checkpoint, total_steps=state.max_steps or None,
                        initial_steps=state.global_step)
        self._remove_hook()  # left by a run that raised (the Trainer then calls no callback)
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._report_deferred(control)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        tokens, samples = self._counter.take()
        step_time_s = self._run.elapsed_s()
        job = self._run.job
        directive = job.directive if job is not None else None
        if (
            job is not None and directive is not None and directive.action is Action.PAUSE
            and (directive.at_step is None or job.steps + 1 >= directive.at_step)
        ):
            control.should_save = True  # saved next; the step is reported (and waits) in on_save
            self._deferred = tokens, samples, step_time_s
            return control
        self._report(control, tokens, samples, step_time_s, saved=False)
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self._deferred is not None:
            tokens, samples, step_time_s = self._deferred
            self._deferred = None
            self._report(control, tokens, samples, step_time_s, saved=True)
        return control

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        self._report_deferred(control)
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._report_deferred(control)
        self._remove_hook()
        self._run.close()

    # -- helpers ---------------------------------------------------------------------------

    def _count(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The model's forward pre-hook: count a micro-batch it trains on."""
        if not module.training:
            return
        batch = dict(kwargs)
        if args and self._main_key not in batch:
            batch[self._main_key] = args[0]
        self._counter.add(batch)

    def _report(
        self, control: TrainerControl, tokens: int, samples: int, step_time_s: float, *,
        saved: bool,
    ) -> None:
        """Report a step; the checkpoint hook asks ``control`` to save unless it just did."""
        self._control = None if saved else control
        try:
            if self._run.report(tokens, samples, step_time_s):
                control.should_training_stop = True
        finally:
            self._control = None

    def _report_deferred(self, control: TrainerControl) -> None:
        """A paused step whose checkpoint the Trainer did not write (another callback cancelled
        the save): report it now; it waits here, and the Trainer saves when it goes on."""
        if self._deferred is not None:
            tokens, samples, step_time_s = self._deferred
            self._deferred = None
            self._report(control, tokens, samples, step_time_s, saved=False)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _checkpoint(self) -> None:
        """The client's checkpoint hook: the Trainer saves right after the current event."""
        if self._control is not None:
            self._control.should_save = True
