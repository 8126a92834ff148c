"""The budgets a cluster job asks for in words: ``powertrain:watts=300,energy_wh=800,mode=auto``.

A Slurm job asks in its comment (``sbatch --comment=powertrain:watts=300``); a site sets a
default for every job in the same syntax (``POWERTRAIN_SLURM_DEFAULT``), which the job's own
values override one by one. The comment may hold other words too: the budgets are its one
whitespace-separated word that starts with ``powertrain:``. Keys:

- ``watts``: wattage budget per GPU, W (a positive number);
- ``energy_wh``: energy budget of the whole job, Wh (a positive number);
- ``mode``: how the wattage budget is held: ``auto``, ``hw``, ``clock`` or ``soft``;
- ``on_exceed``: when the energy budget runs out: ``warn``, ``slow``, ``pause`` or ``stop``.

Anything else (an unknown key, a repeated one, a value that is not a number or not one of the
words) is refused with one line that names it. Pure: the standard library and
``scheduler.jobs`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TypeVar

from scheduler.jobs import Mode, OnExceed

__all__ = ["PREFIX", "BudgetSpec", "budget_spec", "parse_budgets"]

PREFIX = "powertrain:"
"""The word of a job's comment that holds its budgets starts with this."""

_MAX_WATTS = 100_000.0  # as the API's: 100 kW per GPU is absurd on purpose
_MAX_WH = 1e9
_E = TypeVar("_E", bound=StrEnum)


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """Budgets asked for in words; ``None``: not said (the default, or none).

    Attributes:
        watts: Wattage budget per GPU, W.
        energy_wh: Energy budget of the whole job, Wh.
        mode: How the wattage budget is held.
        on_exceed: What happens when the energy budget runs out.
    """

    watts: float | None = None
    energy_wh: float | None = None
    mode: Mode | None = None
    on_exceed: OnExceed | None = None

    def over(self, default: BudgetSpec) -> BudgetSpec:
        """These budgets, each one not said taken from ``default``."""
        return BudgetSpec(
            watts=default.watts if self.watts is None else self.watts,
            energy_wh=default.energy_wh if self.energy_wh is None else self.energy_wh,
            mode=default.mode if self.mode is None else self.mode,
            on_exceed=default.on_exceed if self.on_exceed is None else self.on_exceed,
        )

    @property
    def empty(self) -> bool:
        """Whether no budget is asked for (a mode or policy alone holds nothing)."""
        return self.watts is None and self.energy_wh is None

    def words(self) -> str:
        """These budgets in the syntax they were read from (``powertrain:watts=300``)."""
        parts = [f"{name}={_word(value)}" for name, value in (
            ("watts", self.watts), ("energy_wh", self.energy_wh), ("mode", self.mode),
            ("on_exceed", self.on_exceed),
        ) if value is not None]
        return PREFIX + ",".join(parts)


def _word(value: float | StrEnum) -> str:
    if isinstance(value, StrEnum):
        return value.value
    return f"{value:g}"


def _amount(key: str, text: str, top: float, unit: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a number ({unit})") from None
    if not math.isfinite(value) or value <= 0 or value > top:
        raise ValueError(f"{key}={text} must be a positive number of {unit}, at most {top:g}")
    return value


def _choice(key: str, text: str, kind: type[_E]) -> _E:
    try:
        return kind(text)
    except ValueError:
        names = ", ".join(m.value for m in kind)
        raise ValueError(f"{key}={text!r} is not one of {names}") from None


def parse_budgets(text: str) -> BudgetSpec:
    """The budgets of one ``powertrain:key=value,...`` word (the prefix may be left out).

    Raises:
        ValueError: One line naming what is wrong: an empty or malformed item, an unknown or
            repeated key, a value that is not a positive number or not one of its words.
    """
    body = text.strip().removeprefix(PREFIX)
    if not body:
        raise ValueError(f"{text.strip()!r} asks for nothing: give key=value pairs, such as "
                         f"{PREFIX}watts=300")
    spec = BudgetSpec()
    seen: set[str] = set()
    for item in body.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(f"{item.strip()!r} is not key=value (keys: watts, energy_wh, "
                             "mode, on_exceed)")
        if key in seen:
            raise ValueError(f"{key} is given twice")
        seen.add(key)
        if key == "watts":
            spec = replace(spec, watts=_amount(key, value, _MAX_WATTS, "W per GPU"))
        elif key == "energy_wh":
            spec = replace(spec, energy_wh=_amount(key, value, _MAX_WH, "Wh"))
        elif key == "mode":
            spec = replace(spec, mode=_choice(key, value, Mode))
        elif key == "on_exceed":
            spec = replace(spec, on_exceed=_choice(key, value, OnExceed))
        else:
            raise ValueError(f"unknown key {key!r} (keys: watts, energy_wh, mode, on_exceed)")
    return spec


def budget_spec(comment: str | None) -> BudgetSpec | None:
    """The budgets a job's comment asks for: its word that starts with ``powertrain:``;
    ``None`` when it has none (another comment, or none at all).

    Raises:
        ValueError: The comment has more than one such word, or the word is malformed
            (``parse_budgets``).
    """
    words = [w for w in (comment or "").split() if w.startswith(PREFIX)]
    if not words:
        return None
    if len(words) > 1:
        raise ValueError(f"the comment has {len(words)} {PREFIX} words; give one")
    return parse_budgets(words[0])
