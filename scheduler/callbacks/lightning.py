"""The Lightning callback: ``pip install 'powertrain[lightning]'``, then::

    from scheduler.callbacks.lightning import PowertrainCallback

    trainer = lightning.pytorch.Trainer(callbacks=[PowertrainCallback(name="gpt")])
    trainer.fit(model, data)

See :mod:`scheduler.callbacks` for what every framework callback does.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from scheduler.callbacks import BatchCounter, RunView, TokenCount, TrackedRun
from scheduler.runs import run_identity

__all__ = ["PowertrainCallback"]


class PowertrainCallback(RunView, Callback):
    """Reports a Lightning ``Trainer``'s optimizer steps, tokens and samples to powertrain, and
    obeys the daemon's directives with ``Trainer.save_checkpoint`` and ``Trainer.should_stop``.

    Counting: ``on_train_batch_end`` counts every training batch; a batch after which the
    Trainer's ``global_step`` (its optimizer steps) has moved ends a step, which is reported with
    the sum of its micro-batches (gradient accumulation, ``accumulate_grad_batches``).

    Directives, at the end of that batch:

    - checkpoint: ``trainer.save_checkpoint`` writes ``powertrain-step=<step>.ckpt`` (a full
      Lightning checkpoint, for ``fit(ckpt_path=...)``) in ``dirpath``: by default the folder of
      the Trainer's ``ModelCheckpoint``, else ``<default_root_dir>/checkpoints``. In DDP every rank
      calls it at the same step, as Lightning requires (the daemon names the step).
    - pause: the same checkpoint, then the callback waits in the hook until the daemon resumes.
    - stop: the same checkpoint, then ``trainer.should_stop``: Lightning ends the epoch and its
      ``on_train_end`` hooks, and ``fit`` returns; ``stopped`` is then true. (A ``min_epochs`` or
      ``min_steps`` not reached yet keeps Lightning training, as for early stopping.)

    Distributed: ranks started by torchrun, Slurm or MPI join one job from their launcher's
    environment. Ranks that Lightning starts itself (``strategy="ddp"`` run as ``python
    train.py``) have none; the callback names their run for the client (``POWERTRAIN_RUN_ID``
    from the rendezvous address, the same in every rank; the rank from the Trainer) while the job
    starts, and leaves the environment as it was.

    Args:
        dirpath: Where the checkpoints the daemon asks for go.
        tokens: ``"all"`` (the main input's elements), ``"non_padding"`` (the attention mask's
            sum) or a function of the batch.
        samples: A function of the batch; by default the main input's first dimension.
        input_keys: The main input of a dict-like batch, the first of these keys present. A
            tensor batch is its own main input, a tuple or list batch its first element.
        **track_options: :func:`scheduler.client.track`'s arguments (``name``, ``watts``,
            ``energy_wh``, ``on_exceed``, ``socket_path``, ...), but not ``checkpoint``.
            ``total_steps`` defaults to the Trainer's ``estimated_stepping_batches`` (when
            finite) and ``initial_steps`` to its ``global_step`` (a resumed run goes on counting).

    Attributes:
        last_checkpoint: The checkpoint the daemon asked for last, once written.

    Raises:
        TypeError: ``checkpoint`` is among the options.
        ValueError: ``tokens`` is none of the allowed values, or ``input_keys`` is empty.
    """

    def __init__(
        self,
        *,
        dirpath: str | os.PathLike[str] | None = None,
        tokens: TokenCount = "all",
        samples: Callable[[Any], int] | None = None,
        input_keys: Iterable[str] = ("input_ids",),
        **track_options: Any,
    ) -> None:
        self._dirpath = Path(dirpath) if dirpath is not None else None
        self._counter = BatchCounter(tokens, samples, input_keys)
        self._run = TrackedRun(track_options)
        self._trainer: Trainer | None = None
        self._seen_step = 0
        self.last_checkpoint: Path | None = None

    # -- Lightning's hooks -----------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer = trainer
        self._counter.take()
        self._seen_step = trainer.global_step
        with _named_run(trainer):
            self._run.start(self._checkpoint, total_steps=_planned_steps(trainer),
                            initial_steps=trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        self._counter.add(batch)
        if trainer.global_step == self._seen_step:
            return  # gradient accumulation: the optimizer has not stepped yet
        self._seen_step = trainer.global_step
        tokens, samples = self._counter.take()
        if self._run.report(tokens, samples, self._run.elapsed_s()):
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run.close()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._run.close("error")

    # -- helpers ---------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """The client's checkpoint hook: Lightning's own checkpoint, written now."""
        trainer = self._trainer
        assert trainer is not None, "the job starts in on_train_start"
        folder = self._dirpath
        if folder is None:
            model_checkpoint = trainer.checkpoint_callback
            if isinstance(model_checkpoint, ModelCheckpoint) and model_checkpoint.dirpath:
                folder = Path(model_checkpoint.dirpath)
            else:
                folder = Path(trainer.default_root_dir) / "checkpoints"
        path = folder / f"powertrain-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        self.last_checkpoint = path


def _planned_steps(trainer: Trainer) -> int | None:
    """The optimizer steps the Trainer plans (``max_steps``, or its epochs' batches over the
    accumulation); ``None`` when it does not know."""
    planned = trainer.estimated_stepping_batches
    if isinstance(planned, int | float) and math.isfinite(planned) and planned > 0:
        return int(planned)
    return None


@contextlib.contextmanager
def _named_run(trainer: Trainer) -> Iterator[None]:
    """Name a run that Lightning's own launcher started (no launcher identity in the
    environment, no ``RANK``) for the client while it starts, then restore the environment."""
    env = os.environ
    added: dict[str, str] = {}
    try:
        known = run_identity(env)
    except ValueError:  # the client says why when it starts
        known = None
    if trainer.world_size > 1 and (known is None or known.world_size != trainer.world_size):
        ranks = {"RANK": trainer.global_rank, "LOCAL_RANK": trainer.local_rank,
                 "WORLD_SIZE": trainer.world_size, "LOCAL_WORLD_SIZE": trainer.num_devices}
        added = {name: str(value) for name, value in ranks.items() if name not in env}
        with contextlib.suppress(ValueError):
            known = run_identity({**env, **added})
        if known is None:
            where = f"{env.get('MASTER_ADDR', 'localhost')}:{env.get('MASTER_PORT', '')}"
            added["POWERTRAIN_RUN_ID"] = f"lightning@{where}"
    env.update(added)
    try:
        yield
    finally:
        for name in added:
            env.pop(name, None)
