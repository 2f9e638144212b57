"""Command-line flags generated from the settings dataclasses (``glocalclip/settings.py``), and the
help layout every command shares: each flag's help ends with its default.

A flag keeps the original code's name (``--dpam``); the field it fills is named in the field's
own declaration. Two ways to add a dataclass's flags:
- with defaults: the namespace holds every field, the dataclass's default where the flag is absent;
- ``given_only``: a flag that is absent is absent from the namespace, so "not given" (use the
  checkpoint's value, or the backbone's) differs from an explicit ``--pretrained none``.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Optional, Sequence

from ..inference.settings import ReferenceSettings
from ..model.config import BACKBONE_DEFAULTS, FewShotSettings, GlocalCLIPConfig, LoadSettings
from ..settings import Setting, SettingError, field_default, settings_fields

#: (field name, the default's text) -> the text shown as the default of a ``given_only`` flag
DefaultNote = Callable[[str, str], str]


def shown(value: Any) -> str:
    """A default as a person types it: 6 12 18 24, none."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def help_with_default(action: argparse.Action) -> str:
    """The help text with the default appended, unless the text already states it (or the flag is
    required, positional, or has nothing to show)."""
    text = action.help or ""
    if ("(default" in text or action.required or not action.option_strings
            or action.default is argparse.SUPPRESS or text is argparse.SUPPRESS):
        return text
    if action.nargs == 0:  # a switch
        return f"{text} (default: off)"
    return f"{text} (default: {shown(action.default).replace('%', '%%')})"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's layout, each flag's help ending with its default."""

    def _get_help_string(self, action: argparse.Action) -> str:  # argparse's extension point
        return help_with_default(action)


def new_parser(prog: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)


def _parse_checked(info: Setting, name: str) -> Callable[[str], Any]:
    """``info.parse``, then the field's minimum, as an argparse type (so a bad value is refused
    with the flag's name before anything runs). Allowed values are argparse's ``choices``."""
    if info.minimum is None:
        return info.parse

    def parse(text: str) -> Any:
        value = info.parse(text)
        try:
            info.check(name, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = getattr(info.parse, "__name__", "value")  # argparse names it in "invalid int value"
    return parse


def _default_text(field: dataclasses.Field, info: Setting) -> str:
    if info.default_text is not None:
        return info.default_text
    if info.switch is not None:
        return "off"
    return shown(field_default(field))


def _flag_kwargs(field: dataclasses.Field, info: Setting, given_only: bool, note: Optional[DefaultNote]) -> dict:
    default = _default_text(field, info)
    if given_only and note is not None:
        default = note(field.name, default)
    text = info.help if info.positional or info.required else f"{info.help} (default: {default})"
    kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}
    if info.switch is not None:
        kwargs["action"] = "store_true" if info.switch else "store_false"
    else:
        kwargs.update(type=_parse_checked(info, field.name), choices=info.choices, nargs=info.nargs,
                      metavar=info.metavar)
    if info.positional:
        return kwargs
    kwargs["dest"] = field.name
    kwargs["required"] = info.required
    value = field_default(field)
    kwargs["default"] = argparse.SUPPRESS if given_only else (list(value) if isinstance(value, tuple) else value)
    return kwargs


def add_settings(parser: Any, cls: type, *, given_only: bool = False, note: Optional[DefaultNote] = None,
                 fields: Optional[Sequence[str]] = None, positional: Sequence[str] = (),
                 required: Sequence[str] = ()) -> None:
    """One flag per field of ``cls`` declared with ``setting`` (and not ``cli=False``) on ``parser``
    (a parser or an argument group). ``note`` rewrites the shown default of ``given_only`` flags.
    A command sharing a dataclass takes the ``fields`` it uses, some ``positional`` or ``required``."""
    for field, info in settings_fields(cls):
        if not info.cli or (fields is not None and field.name not in fields):
            continue
        if field.name in positional or field.name in required:
            info = dataclasses.replace(info, positional=field.name in positional, required=field.name in required)
        kwargs = _flag_kwargs(field, info, given_only, note)
        if info.positional:
            parser.add_argument(field.name, **kwargs)
        else:
            names = [f"--{info.flag_name(field.name)}"] + [f"--{a}" for a in info.aliases]
            parser.add_argument(*names, **kwargs)


def given_settings(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` whose flags are in ``args`` (all of them, for flags with defaults)."""
    return {f.name: getattr(args, f.name) for f, info in settings_fields(cls)
            if info.cli and hasattr(args, f.name)}


def parse_given(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``, leaving the fields of ``cls`` whose flags are absent out of the namespace
    rather than at their defaults, so that "not given" differs from "given the default value"
    (``train.py --resume`` takes the checkpoint's value for a setting not given). The dataclass
    fills in its defaults when it is built from the namespace (:func:`settings_from_args`)."""
    unset = object()
    namespace = argparse.Namespace(**{f.name: unset for f, _ in settings_fields(cls)})
    args = parser.parse_args(list(argv), namespace=namespace)  # argparse fills only attributes not yet set
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if v is not unset})


def for_command_line(error: SettingError, *classes: type) -> str:
    """A :class:`SettingError`'s message with each field shown as the flag that sets it."""
    flags = {f.name: f"--{info.flag_name(f.name)}" for cls in classes for f, info in settings_fields(cls)}
    return error.render(lambda name: flags.get(name, name))


def settings_from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """An instance of ``cls`` from the parsed flags (``fixed`` fields win); it validates itself."""
    return cls(**{**given_settings(cls, args), **fixed})


# ---------------------------------------------------------------------------- the model's flags
MODEL_GROUP = "model (saved in every checkpoint)"


def _train_default(name: str, default: str) -> str:
    """A model flag's default in train: the class default, and a backbone's own where it has one."""
    presets = [f"{shown(v[name])} with --backbone {b}" for b, v in BACKBONE_DEFAULTS.items() if name in v]
    return "; ".join([default] + presets)


def _checkpoint_default(name: str, default: str) -> str:
    return f"the checkpoint's; {default} for an original-format one"


def add_model_flags(parser: Any, for_training: bool) -> None:
    """The model flags (``GlocalCLIPConfig``). Only the flags given reach the namespace: the rest
    come from the backbone's defaults (train) or from the checkpoint (test, predict, convert)."""
    group = parser.add_argument_group(MODEL_GROUP)
    add_settings(group, GlocalCLIPConfig, given_only=True, note=_train_default if for_training else _checkpoint_default)


def add_load_flags(parser: Any) -> None:
    """``--trust_checkpoint`` (``LoadSettings``), on every command that loads a checkpoint or weights file."""
    add_settings(parser, LoadSettings)


def trusted(args: argparse.Namespace) -> bool:
    """Whether the command line opted in to loading files that could run code (``--trust_checkpoint``)."""
    return settings_from_args(LoadSettings, args).trust_checkpoint


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The model settings given on a command line (``--pretrained none`` counts)."""
    return given_settings(GlocalCLIPConfig, args)


# ---------------------------------------------------------------------------- few-shot --reference
REFERENCE_GROUP = "few-shot (with --reference)"


def add_reference_flags(parser: Any, save: bool = True) -> None:
    """``--reference`` (and ``--save_reference``) with the few-shot settings, given-only: a saved bank
    keeps its own settings unless one is given (then they must agree)."""
    group = parser.add_argument_group(REFERENCE_GROUP)
    add_settings(group, ReferenceSettings,
                 fields=("reference", "save_reference", "overwrite_reference") if save else ("reference",))
    add_settings(group, FewShotSettings, given_only=True,
                 note=lambda name, default: f"{default}; a saved bank's own")


def refuse_few_shot_flags_unused(args: argparse.Namespace, fields: Sequence[str], switch: str, given_as: str,
                                 few_shot_on: bool) -> None:
    """Few-shot flags given while few-shot is off would do nothing: refused in one message naming
    them and ``switch`` (given as ``given_as``), the flag that turns few-shot on."""
    unused = [name for name in fields  # a switch not given is False; a value of 0 counts as given
              if getattr(args, name, None) is not None and getattr(args, name) is not False]
    if few_shot_on or not unused:
        return
    named = " ".join(f"{{{name}}}" for name in unused)
    them = "them" if len(unused) > 1 else "it"
    raise SettingError(unused[0], f"{named} act{'' if len(unused) > 1 else 's'} only with a few-shot bank, and "
                                  f"there is none: give {{{switch}}} {given_as} too, or leave {them} out",
                       also=(*unused[1:], switch))


def reference_of(args: argparse.Namespace) -> tuple[Any, Optional[dict[str, Any]]]:
    """(ReferenceSettings, the few-shot fields given or None) of a command line: only the fields given,
    so that a saved bank's own settings fill the rest (``engine.few_shot.load_reference``). Few-shot
    flags (and ``--save_reference``) without ``--reference`` are refused."""
    given = given_settings(FewShotSettings, args)
    refuse_few_shot_flags_unused(args, ["save_reference", "overwrite_reference", *given], "reference", "DIR|GLOB|BANK",
                                 getattr(args, "reference", None) is not None)
    return settings_from_args(ReferenceSettings, args), (given or None)
