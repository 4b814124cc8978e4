"""The one way a typed config refuses a value out of range.

Every typed config dataclass (an option of a registry, and ``cache``, ``train``, ``labels``, ``probe``) derives from
``Checked``: it names its ``section`` and declares, in ``rules()``, a ``Rule`` per constrained field. ``validate``
applies them when the config is built (``__post_init__``), so ``Registry.typed_config``, ``OmegaConf.to_object``,
``dataclasses.replace`` and a direct call all refuse a bad value, in one line naming the full key and what is
allowed: ``fusion.lr must be > 0, got 0.0``, ``pretext.fill: 'noise' is not one of zero, mean``.

To add a check: add ``"<field>": <rule>`` to the class's ``rules()`` (a subclass extends ``super().rules()``), with a
rule made by ``at_least``, ``above``, ``within``, ``one_of`` or ``optional``, or a ``Rule`` of its own for anything
else. Give the fields a rule refers to (``eval_every`` reads ``steps``) before it. ``tests/test_validation.py`` sets
each declared rule's ``bad`` value, so a new rule is tested as it is added. A check that needs the data (the image
size, the number of pretexts) is no rule: it stays where the data is known (``Pretext.check``, a head's ``__init__``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

from ssl_fusion.runtime.errors import UserError

MUST_BE = "{key} must be {allowed}, got {value!r}"
NOT_ONE_OF = "{key}: {value!r} is not one of {allowed}"


@dataclass(frozen=True)
class Rule:
    """What one field allows: ``ok(value)``, the words for it, and a value it refuses (for the contract test)."""

    ok: Callable[[Any], bool]
    allowed: str
    bad: Any
    wording: str = MUST_BE  # the refusal, from key, allowed and value

    def refusal(self, key: str, value: Any) -> str:
        return self.wording.format(key=key, allowed=self.allowed, value=value)


def at_least(low: float, note: str = "") -> Rule:
    return Rule(lambda value: value >= low, f">= {low}{note}", low - 1)


def above(low: float, note: str = "") -> Rule:
    return Rule(lambda value: value > low, f"> {low}{note}", low)


def within(low: float, high: float, ends: str = "[]", note: str = "") -> Rule:
    """``low`` to ``high``, each end included (``[``, ``]``) or not (``(``, ``)``)."""
    closed_low, closed_high = ends[0] == "[", ends[1] == "]"

    def ok(value: Any) -> bool:
        return (low <= value if closed_low else low < value) and (value <= high if closed_high else value < high)

    return Rule(ok, f"in {ends[0]}{low}, {high}{ends[1]}{note}", high + 1 if closed_high else high)


def one_of(choices: Iterable[Any]) -> Rule:
    choices = tuple(choices)
    bad = max(choices) + 1 if all(isinstance(c, int) for c in choices) else "none_of_these"
    return Rule(lambda value: value in choices, ", ".join(map(str, choices)), bad, NOT_ONE_OF)


def optional(rule: Rule) -> Rule:
    """``rule``, or null (which the field's owner reads as unset)."""
    return Rule(lambda value: value is None or rule.ok(value), rule.allowed, rule.bad, rule.wording)


class Checked:
    """A typed config that checks its values when it is built (see the module's docstring)."""

    section: ClassVar[str]  # the key the config lives under: fusion, pretext, cache, ...

    def rules(self) -> dict[str, Rule]:
        """Field -> what it allows; fields without a rule take any value of their type."""
        return {}

    def __post_init__(self) -> None:
        validate(self)


def validate(config: Checked) -> None:
    """A one-line UserError naming the first field of ``config`` that its rule refuses."""
    for key, rule in config.rules().items():
        value = getattr(config, key)
        if not rule.ok(value):
            raise UserError(rule.refusal(f"{config.section}.{key}", value))
