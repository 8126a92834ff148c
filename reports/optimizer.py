"""What the energy optimiser did for a job, as the report shows it.

A job run with ``--objective`` (or slowed by its energy budget) has one stored search per tuning
(read by ``reports.jobrows.searches``): every setting it probed with the steps, time and energy
measured there, and the setting it chose. The report compares the chosen setting with the
search's top setting (the GPU's default limit or clock, or the job's wattage budget when that is
lower), both measured in the same job: energy per token and throughput, and by how much they
changed. Tokens per step come from the job's progress reports; without tokens the figures are
per step. A joint search (the micro-batch with the setting) compares the chosen pair with the
job's own micro-batch at the top setting, and says which micro-batch it chose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from energy.optimizer import UNFINISHED, Knob
from energy.units import mw_to_w
from reports.jobrows import ProbeRow, SearchRow

__all__ = ["OptimizerSummary", "SettingFigures", "summarise_search", "summary_lines"]


@dataclass(frozen=True, slots=True)
class SettingFigures:
    """One setting as measured in the job.

    Attributes:
        setting: mW (power limit) or MHz (locked clock).
        power_w / j_per_step / steps_per_s: Measured power, energy per step, steps per second.
        j_per_token / tokens_per_s: The same per token, when the job reports tokens.
        steps: Steps measured there.
    """

    setting: int
    power_w: float
    j_per_step: float
    steps_per_s: float
    j_per_token: float | None
    tokens_per_s: float | None
    steps: int

    def to_json(self) -> dict[str, Any]:
        return {
            "setting": self.setting, "power_w": self.power_w, "j_per_step": self.j_per_step,
            "steps_per_s": self.steps_per_s, "j_per_token": self.j_per_token,
            "tokens_per_s": self.tokens_per_s, "steps": self.steps,
        }


@dataclass(frozen=True, slots=True)
class OptimizerSummary:
    """One search of the energy optimiser for a job, as reported.

    Attributes:
        job_id / number: The job, and which of its searches (1 first, 2 after a re-tune...).
        objective / knob: What it optimised (``energy``, ``cost``, ...), over ``power_limit``
            (settings in mW) or ``sm_clocks`` (MHz).
        chosen / default: The chosen setting and the search's top setting, as measured (None
            when the top setting was not probed, e.g. a throughput search starting below it).
        probes / revisions / reason: Settings probed, revisions once done, why it chose.
        profiling_s / profiling_j: What profiling cost the job.
        micro_batch / default_micro_batch: A joint search's chosen micro-batch and the job's
            own (``default`` is measured at the latter); None for the setting alone.
    """

    job_id: int
    number: int
    objective: str
    knob: Knob
    chosen: SettingFigures | None
    default: SettingFigures | None
    default_setting: int
    probes: int
    revisions: int
    reason: str
    feasible: bool
    profiling_s: float
    profiling_j: float
    micro_batch: int | None = None
    default_micro_batch: int | None = None

    @property
    def finished(self) -> bool:
        """False when the job ended before the search did (its best setting so far is shown)."""
        return not self.reason.startswith(UNFINISHED)

    @property
    def energy_change(self) -> float | None:
        """Energy per step (and per token) at the chosen setting against the default, -0.3 =
        30 % less."""
        if self.chosen is None or self.default is None or self.default.j_per_step <= 0:
            return None
        return self.chosen.j_per_step / self.default.j_per_step - 1.0

    @property
    def throughput_change(self) -> float | None:
        """Steps (and tokens) per second at the chosen setting against the default."""
        if self.chosen is None or self.default is None or self.default.steps_per_s <= 0:
            return None
        return self.chosen.steps_per_s / self.default.steps_per_s - 1.0

    def show(self, setting: int) -> str:
        """A setting in its unit: ``250 W`` or ``1,230 MHz``."""
        return f"{mw_to_w(setting):g} W" if self.knob is Knob.POWER_LIMIT else f"{setting:,} MHz"

    def to_json(self) -> dict[str, Any]:
        return {
            "search": self.number, "objective": self.objective, "knob": self.knob.value,
            "chosen": self.chosen.to_json() if self.chosen else None,
            "default": self.default.to_json() if self.default else None,
            "default_setting": self.default_setting,
            "energy_change": self.energy_change, "throughput_change": self.throughput_change,
            "probes": self.probes, "revisions": self.revisions, "reason": self.reason,
            "feasible": self.feasible, "finished": self.finished,
            "profiling_s": self.profiling_s,
            "profiling_j": self.profiling_j,
            "micro_batch": self.micro_batch, "default_micro_batch": self.default_micro_batch,
        }


def _figures(probe: ProbeRow | None, tokens_per_step: float | None) -> SettingFigures | None:
    if probe is None or probe.steps <= 0 or probe.time_s <= 0:
        return None
    steps_per_s = probe.steps / probe.time_s
    return SettingFigures(
        setting=probe.setting,
        power_w=probe.power_w,
        j_per_step=probe.energy_per_step_j,
        steps_per_s=steps_per_s,
        j_per_token=probe.energy_per_step_j / tokens_per_step if tokens_per_step else None,
        tokens_per_s=steps_per_s * tokens_per_step if tokens_per_step else None,
        steps=probe.steps,
    )


def summarise_search(search: SearchRow, tokens_per_step: float | None) -> OptimizerSummary:
    """A stored search as reported; ``tokens_per_step`` from the job's progress (or None)."""
    return OptimizerSummary(
        job_id=search.job_id,
        number=search.number,
        objective=search.objective,
        knob=Knob(search.knob),
        chosen=_figures(search.probe(search.setting, search.micro_batch), tokens_per_step),
        default=_figures(search.probe(search.top_setting, search.default_micro_batch),
                         tokens_per_step),
        default_setting=search.top_setting,
        probes=len(search.probes),
        revisions=search.revisions,
        reason=search.reason,
        feasible=search.feasible,
        profiling_s=search.profiling_time_s,
        profiling_j=search.profiling_energy_j,
        micro_batch=search.micro_batch,
        default_micro_batch=search.default_micro_batch,
    )


def _pct(x: float) -> str:
    return f"{100 * x:+.0f} %"


def summary_lines(summaries: Sequence[OptimizerSummary]) -> list[str]:
    """One paragraph per search: what was chosen, and energy and throughput against the default.
    """
    lines = []
    for s in summaries:
        knob = "power limit" if s.knob is Knob.POWER_LIMIT else "locked SM clock"
        head = (f"Job {s.job_id}, energy optimiser ({s.objective}"
                + (f", search {s.number}" if s.number > 1 else "") + "): "
                f"{knob} {s.show(s.chosen.setting if s.chosen else s.default_setting)}"
                + (f", micro-batch {s.micro_batch} (the job's own: {s.default_micro_batch})"
                   if s.micro_batch is not None else "")
                + ("" if s.feasible else " (no setting met the constraints)")
                + ("" if s.finished else " (best so far: the job ended before the search did)")
                + f", from {s.probes} settings probed in {s.profiling_s:,.0f} s"
                + (f", revised {s.revisions}x as it ran" if s.revisions else "") + ".")
        lines.append(head)
        if s.chosen is None or s.default is None:
            continue
        if s.chosen.j_per_token is not None and s.default.j_per_token is not None:
            assert s.chosen.tokens_per_s is not None and s.default.tokens_per_s is not None
            unit = (f"{s.chosen.j_per_token:.3g} J/token at {s.chosen.tokens_per_s:,.0f} tokens/s",
                    f"{s.default.j_per_token:.3g} J/token at {s.default.tokens_per_s:,.0f} "
                    "tokens/s")
            what = "energy per token"
        else:
            unit = (f"{s.chosen.j_per_step:.3g} J/step at {s.chosen.steps_per_s:,.2f} steps/s",
                    f"{s.default.j_per_step:.3g} J/step at {s.default.steps_per_s:,.2f} steps/s")
            what = "energy per step"
        energy, speed = s.energy_change, s.throughput_change
        assert energy is not None and speed is not None
        chosen, default = s.show(s.chosen.setting), s.show(s.default.setting)
        if s.micro_batch is not None:
            chosen += f" micro-batch {s.micro_batch}"
            default += f" micro-batch {s.default_micro_batch}"
        lines.append(
            f"  {chosen}: {unit[0]}; default {default}: "
            f"{unit[1]}: {what} {_pct(energy)}, throughput {_pct(speed)}."
        )
    return lines
