"""One line for a config that does not parse: which key, what it expects, the closest valid key.

jsonargparse reports a bad key or value with the parser's whole usage (about 85 lines for ``acpo
fit``) and a message in one of a few forms; :func:`explain` turns those forms into the one line
that :class:`acpo_lightning.cli.ACPOArgumentParser` prints after ``acpo: error:``. A form it does
not know is kept, on one line, with a pointer to ``--help``.

Example:
    >>> from typing import Literal, Optional
    >>> type_name(Optional[int]), type_name(Literal["penalty", "constraint"])
    ('int or null', "one of 'penalty', 'constraint'")
    >>> closest("model.w_percc", ["model.w_perc", "model.w_anchor", "trainer.max_steps"])
    'model.w_perc'
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import types
import typing
from argparse import ArgumentParser
from collections.abc import Iterable
from typing import Any, Literal

_UNRECOGNIZED = re.compile(r"unrecognized arguments: --([^\s=]+)")
_NOT_ACCEPTED = re.compile(r"does not accept option '([^']+)'")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":\s*(.*)', re.DOTALL)
_IN_CLASS = re.compile(r"Problem with given class_path '([^']+)':\s*(.*)", re.DOTALL)
_OPTION = re.compile(r"Option '([^']+)' is not accepted")
_GIVEN = re.compile(r"(?:Got value|Given value): (.*)")
_REQUIRED = re.compile(r"the following arguments are required: ([^\n]+)")
#: jsonargparse keeps an argument's type hint here (``ActionTypeHint`` is not public).
_HINT = "_typehint"


class ConfigError(ValueError):
    """A config key that does not exist or a value of the wrong type (found while parsing)."""


def explain(parser: ArgumentParser, message: str, args: list[str] | None = None) -> str:
    """The one-line explanation of jsonargparse's ``message``.

    Args:
        parser: the parser that failed (the root parser or a subcommand's).
        message: jsonargparse's error message (several lines for a type error).
        args: the command line it parsed, to find the subcommand (``fit``, ...).

    Returns:
        One line: the key, what it expects or the closest valid key, and the fix.
    """
    parser = _command_parser(parser, args or [])
    help_command = f"`{parser.prog.replace(' [options]', '')} --help`"
    help_hint = f"{help_command} lists every key with its type"
    if (match := _REQUIRED.search(message)) and _reads_config(parser) and not _gave_config(args):
        return (
            f"no --config was given, and {match.group(1).strip().rstrip('.')} must be set. Fix: give "
            "the run config(s) you train with: --config configs/acpo.yaml [--config ...]"
        )
    if match := _UNRECOGNIZED.search(message):
        return _unknown(match.group(1), "on the command line", _keys(parser), help_hint)
    if match := _NOT_ACCEPTED.search(message):
        return _unknown(match.group(1), "in a config file", _keys(parser), help_hint)
    if match := _PARSER_KEY.match(message):
        key, body = match.groups()
        valid = _keys(parser)
        while nested := _IN_CLASS.search(body):  # an init arg of a class_path, maybe nested
            class_path, body = nested.groups()
            valid = {f"{key}.init_args.{k}": v for k, v in _init_parameters(class_path).items()}
            if option := _OPTION.match(body):
                where = "on the command line or in a config file"
                return _unknown(f"{key}.init_args.{option.group(1)}", where, valid, help_hint)
            if not (inner := _PARSER_KEY.match(body)):
                break
            key, body = f"{key}.init_args.{inner.group(1)}", inner.group(2)
        if key in valid and "Expected a" in body:
            return _wrong_type(key, *valid[key], body)
        message = f"{key}: {body}"
    lines = [line.strip().rstrip(".") for line in message.splitlines() if line.strip()]
    return f"{'; '.join(lines)}. Fix: see {help_command}"


def type_name(hint: Any) -> str:
    """A type hint as a user reads it: ``int or null``, ``one of 'a', 'b'``, ``Module``."""
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(value) for value in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = typing.get_args(hint)
        literals = [p for p in parts if typing.get_origin(p) is Literal]
        values = [value for part in literals for value in typing.get_args(part)]
        names = [type_name(Literal[tuple(values)])] if values else []  # one "one of" for all
        names += [type_name(p) for p in parts if p not in literals]
        return " or ".join(dict.fromkeys(names))
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def closest(key: str, valid: Iterable[str]) -> str | None:
    """The valid key nearest to ``key``; keys of the same parent (``model.``) are compared first."""
    valid, parent = list(valid), key.rpartition(".")[0]
    siblings = [k for k in valid if k.rpartition(".")[0] == parent] or list(valid)
    for cutoff in (0.6, 0.0):  # a near miss if there is one, else whatever is nearest
        if matches := difflib.get_close_matches(key, siblings, n=1, cutoff=cutoff):
            return matches[0]
    return None


def _unknown(key: str, where: str, valid: dict[str, tuple[Any, Any]], help_hint: str) -> str:
    nearest = closest(key, valid)
    suggestion = (
        f"; closest valid key: {nearest} ({type_name(valid[nearest][0])})" if nearest else ""
    )
    return f"unknown key {key} {where}{suggestion}. Fix: correct or remove the key; {help_hint}"


def _wrong_type(key: str, hint: Any, default: Any, body: str) -> str:
    given = _GIVEN.search(body)
    got = f", got {given.group(1).strip()!r}" if given else ""
    example = _example(default)
    fix = (
        f"e.g. `--{key} {example}` (the default)" if example else f"give {key} a value of that type"
    )
    return f"{key} expects {type_name(hint)}{got}. Fix: {fix}"


def _example(default: Any) -> str | None:
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, (int, float, str)) and str(default):
        return str(default)
    return None


def _command_parser(parser: ArgumentParser, args: list[str]) -> ArgumentParser:
    """The subcommand's parser when ``parser`` is the root one and ``args`` name a subcommand."""
    subcommands = getattr(parser, "_subcommands_action", None)
    if subcommands is None:
        return parser
    chosen = next((a for a in args if a in subcommands._name_parser_map), None)
    return subcommands._name_parser_map[chosen] if chosen else parser


def _reads_config(parser: ArgumentParser) -> bool:
    """Whether ``parser`` reads its arguments from ``--config`` files (not ``acpo export``'s)."""
    from jsonargparse import ActionConfigFile

    return any(isinstance(action, ActionConfigFile) for action in parser._actions)


def _gave_config(args: list[str] | None) -> bool:
    return any(a in ("--config", "-c") or a.startswith("--config=") for a in args or [])


def _keys(parser: ArgumentParser) -> dict[str, tuple[Any, Any]]:
    """Each typed key of ``parser`` (``model.tau``, ...) with its type hint and default."""
    return {
        action.dest: (getattr(action, _HINT), action.default)
        for action in parser._actions
        if hasattr(action, _HINT)
    }


def _init_parameters(class_path: str) -> dict[str, tuple[Any, Any]]:
    """The parameters of ``class_path``'s ``__init__`` (or of a function): hint and default."""
    module, _, name = class_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name)
        signature = inspect.signature(target)
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except (ImportError, AttributeError, TypeError, ValueError, NameError):
        return {}
    return {
        p.name: (hints.get(p.name, Any), None if p.default is p.empty else p.default)
        for p in signature.parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
