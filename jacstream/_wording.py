"""The library's messages in the words of the ``jacstream`` command.

Errors and hints are written once, for the Python API: they name arguments
(``Pass overwrite=True``, ``strategy='pfor'``, ``the same block_size``) and
calls (``call jacstream.jacobian() again``). The command shows the same
messages with its own flags instead: each argument named in a message that is
a flag of the command becomes that flag, read from the command's parser (so a
new option needs no entry here), and the few phrases about Python calls have
their command-line counterparts in :data:`PHRASES`.

Examples
--------
>>> import argparse
>>> p = argparse.ArgumentParser()
>>> _ = p.add_argument("--overwrite", action="store_true")
>>> _ = p.add_argument("--block-size", type=int)
>>> cli_wording("Pass overwrite=True, or resume with the same block_size=4.", p)
'Pass --overwrite, or resume with the same --block-size 4.'
"""

from __future__ import annotations

import argparse
import re

__all__ = ["PHRASES", "cli_wording"]

# (API phrase, the command's phrase), tried in order; a capital letter is kept.
PHRASES = (
    (r"call jacstream\.jacobian\(\) again with the same arguments",
     "run the same 'jacstream compute' command again"),
    (r"\(with or without client=\)", "(with or without --scheduler)"),
    (r"call jacstream\.jacobian\(\) again", "run 'jacstream compute' again"),
    (r"compute one with jacstream\.jacobian\(\)", "compute one with 'jacstream compute'"),
    (r"jacstream\.jacobian\(\)", "'jacstream compute'"),
    (r"add a feature axis: inputs\[\.\.\., None\]",
     "add a feature axis: save the array as x[..., None] (shape (batch, steps, 1))"),
)
# API arguments the command spells differently (dest of the command's option).
ALIASES = {"client": "scheduler"}

_ASSIGN = re.compile(r"\b([a-z][a-z_]*)=(True|False|slice\([^)]*\)|'[^']*'|\"[^\"]*\"|[\w.:+-]+)?")
_SLICE = re.compile(r"slice\(([^)]*)\)")
_IDENT = re.compile(r"\b[a-z]+(?:_[a-z]+)+\b")   # block_size: an argument, never a word
_QUOTED = re.compile(r"('[^']*'|\"[^\"]*\")")


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The command's arguments by the name the API gives them (their ``dest``)."""
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "version")}


def _assignment(m: re.Match[str], flags: dict[str, argparse.Action]) -> str:
    name, value = m.group(1), m.group(2)
    action = flags.get(ALIASES.get(name, name))
    if action is None:
        return m.group(0)
    if not action.option_strings:                  # store='j.zarr': the STORE argument
        return f"{action.metavar or action.dest.upper()} {value or ''}".rstrip()
    flag = max(action.option_strings, key=len)
    if value is None or action.nargs == 0:     # --overwrite, --unsafe: a switch
        return f"without {flag}" if value == "False" else flag
    value = value.strip("'\"")
    sl = _SLICE.fullmatch(value)
    if sl:      # slice(100, 200, None): the command's 100:200
        parts = ["" if v.strip() == "None" else v.strip() for v in sl.group(1).split(",")]
        value = ":".join(parts[:2]) + (f":{parts[2]}" if len(parts) > 2 and parts[2] else "")
    return f"{flag} {value.lower() if value in ('True', 'False') else value}"


def _phrase(pattern: str, new: str, text: str) -> str:
    def keep_case(m: re.Match[str]) -> str:
        return new[:1].upper() + new[1:] if m.group(0)[:1].isupper() else new

    return re.sub(pattern, keep_case, text, flags=re.IGNORECASE)


def cli_wording(text: str, parser: argparse.ArgumentParser) -> str:
    """``text`` (a message for the Python API) with the flags of the command ``parser`` parses."""
    for pattern, new in PHRASES:
        text = _phrase(pattern, new, text)
    flags = _flags(parser)
    text = _ASSIGN.sub(lambda m: _assignment(m, flags), text)
    # Bare argument names, outside quoted strings (paths, values).
    parts = _QUOTED.split(text)
    for i in range(0, len(parts), 2):
        parts[i] = _IDENT.sub(lambda m: max(flags[m.group(0)].option_strings, key=len)
                              if flags.get(m.group(0)) and flags[m.group(0)].option_strings
                              else m.group(0), parts[i])
    return "".join(parts)
