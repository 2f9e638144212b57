"""Settings declared once. A dataclass field made by :func:`setting` carries its default, help text,
allowed values and command-line flag; the dataclass validates its values with :func:`check_settings`,
and the command lines are generated from the same fields (``apps/flags.py``).

Neither torch nor argparse is imported here: the model layer's config uses this module.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

_KEY = "glocalclip.setting"


@dataclass(frozen=True)
class Setting:
    """What a field says about itself beyond its type and default."""

    help: str
    flag: Optional[str] = None           # the flag's name when it is not the field's (--dpam -> dpam_layer)
    aliases: tuple[str, ...] = ()        # more names for the same flag
    choices: Optional[tuple] = None      # the allowed values
    minimum: Optional[float] = None      # the smallest allowed value (of every item, with nargs)
    parse: Optional[Callable[[str], Any]] = None  # text on a command line -> value
    nargs: Optional[Any] = None          # argparse nargs ("+", 2) for sequences
    metavar: Optional[Any] = None
    switch: Optional[bool] = None        # a flag without a value; the value it sets (True, or False for --no_x)
    required: bool = False               # on the command line (the dataclass may still have a default)
    positional: bool = False
    cli: bool = True                     # False: a library setting without a flag
    default_text: Optional[str] = None   # what the default means, where its value does not say it
    optional: bool = False               # None is allowed (the default is None)

    def flag_name(self, field_name: str) -> str:
        return self.flag or field_name

    def label(self, field_name: str) -> str:
        """The name in messages: the field, and its flag where that is spelled differently."""
        flag = self.flag_name(field_name)
        return field_name if flag == field_name else f"{field_name} (--{flag})"

    def check(self, field_name: str, value: Any) -> None:
        """Raise ValueError naming the setting if ``value`` is not allowed."""
        if value is None and self.optional:
            return
        items = value if self.nargs is not None and isinstance(value, (list, tuple)) else [value]
        for item in items:
            if self.choices is not None and item not in self.choices:
                raise ValueError(f"{self.label(field_name)} must be one of {', '.join(map(str, self.choices))}, "
                                 f"got {item!r}")
            if self.minimum is not None and item < self.minimum:
                raise ValueError(f"{self.label(field_name)} must be >= {self.minimum}, got {item}")


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
            choices: Optional[Sequence] = None, aliases: Sequence[str] = (), **options: Any) -> Any:
    """A dataclass field with its :class:`Setting` (see there for ``options``). ``parse`` defaults
    to the type of ``default`` (int, float), else str."""
    if options.get("parse") is None and options.get("switch") is None:
        options["parse"] = type(default) if type(default) in (int, float) else str
    info = Setting(help=help, choices=tuple(choices) if choices is not None else None, aliases=tuple(aliases),
                   optional=default is None, **options)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: info})


def setting_of(field: dataclasses.Field) -> Optional[Setting]:
    return field.metadata.get(_KEY)


def settings_fields(cls_or_obj: Any) -> list[tuple[dataclasses.Field, Setting]]:
    """The fields declared with :func:`setting`, in declaration order."""
    return [(f, setting_of(f)) for f in dataclasses.fields(cls_or_obj) if setting_of(f) is not None]


def check_settings(obj: Any) -> None:
    """Every field's own rule (allowed values, minimum); called by the dataclasses' ``__post_init__``."""
    for f, info in settings_fields(obj):
        info.check(f.name, getattr(obj, f.name))


def field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


class SettingError(ValueError):
    """A value a setting cannot take, naming the setting by its field: ``message`` writes
    ``{field}`` (and each of ``also``) where a setting is named. In Python the field's name is
    shown; a command line shows its flag instead (``apps/flags.py: for_command_line``)."""

    def __init__(self, field: str, message: str, also: Sequence[str] = ()):
        self.field = field
        self.fields = (field, *also)
        self.template = message
        super().__init__(self.render(lambda name: name))

    def render(self, name_of: Callable[[str], str]) -> str:
        return self.template.format(**{f: name_of(f) for f in self.fields})


def template_literal(text: str) -> str:
    """``text`` (a path, a user's value) inside a :class:`SettingError` template, its braces shown as they are."""
    return text.replace("{", "{{").replace("}", "}}")


def known_fields_only(cls: Any, d: dict[str, Any], what: str) -> dict[str, Any]:
    """``d`` when every key is a field of ``cls``; a saved dict from a newer version is refused by
    name (``what`` names the settings in the message)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(names)}")
    return d
