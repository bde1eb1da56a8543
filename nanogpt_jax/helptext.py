"""`nanogpt-jax COMMAND --help`: the command's lines of the usage text, then every option of its config
dataclass with its type, default and meaning. The meanings are the comments written beside the fields in
config.py, read from its source, so that they are written once: a field's comment on its own line(s), else
the comment lines right above it; comment lines above a field that has its own are a heading for the fields
that follow."""

import ast
import dataclasses
import inspect
import io
import shutil
import textwrap
import tokenize
import typing

from .config import IGNORED


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """line number -> (comment text, whether the line holds nothing else)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = not tok.line[:tok.start[1]].strip()
            out[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    return out


def field_notes(cls) -> dict[str, tuple[type, str | None, str]]:
    """field name -> (the class defining it, heading above it or None, meaning), from the comments in each
    defining class's source; no meaning where the source cannot be read (a frozen install)."""
    notes = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            source = ""
        comments = _comments(source)
        for node in ast.parse(source).body[0].body if source else ():
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                notes[node.target.id] = (klass, *_notes_of(node, comments))
    return notes


def _notes_of(node, comments) -> tuple[str | None, str]:
    own = " ".join(text for line, (text, alone) in sorted(comments.items())
                   if node.lineno <= line <= node.end_lineno and not alone)
    above, line = [], node.lineno - 1
    while line in comments and comments[line][1]:
        above.insert(0, comments[line][0])
        line -= 1
    above = " ".join(above) or None
    return (above, own) if own else (None, above or "")


def _type_name(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return "str, repeated"
    return " | ".join("None" if t is type(None) else t.__name__ for t in typing.get_args(hint) or (hint,))


def _default(field) -> str:
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(value, str) and value and value.isprintable() and " " not in value:
        return value
    return "(none)" if value == () else repr(value)


def options_help(cls, width: int) -> list[str]:
    """One entry per option of cls: --name=DEFAULT, then its type and meaning, wrapped to width."""
    notes, hints = field_notes(cls), typing.get_type_hints(cls)
    lines, heading, owner = [], None, None
    for field in dataclasses.fields(cls):
        klass, above, meaning = notes.get(field.name, (owner, None, ""))
        if klass is not owner and owner is not None and not above:
            above = f"{klass.__name__.removesuffix('Config').lower()}'s own"  # a subclass's fields follow
        owner = klass
        if above and above != heading:
            lines.append(f" {above}")
            heading = above
        left = f"  --{field.name}={_default(field)}"
        text = f"{_type_name(hints[field.name])}" + (f": {meaning}" if meaning else "")
        wrapped = textwrap.wrap(text, max(40, width - 36))
        first = f"{left:<35} {wrapped[0]}" if len(left) < 35 else f"{left}\n{'':<35} {wrapped[0]}"
        lines += [first] + [f"{'':<35} {more}" for more in wrapped[1:]]
    return lines


def command_help(command: str, usage: str, cls) -> str:
    """The help of one command: usage, its lines of the general usage text, its options, the common flags."""
    width = min(shutil.get_terminal_size((120, 24)).columns, 120)
    general, _, footer = usage.partition("\n\n--debug")
    blocks = ["usage:", *_command_lines(command, general)]
    if cls is not None:
        blocks[0] = f"usage: nanogpt-jax {command} [CONFIG.py ...] [--key=value | --key value ...]\n"
        fields = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(k for k in IGNORED if k not in fields)
        blocks += ["", "options (--key=value or --key value; CONFIG.py files may set them too; the last one given "
                   "wins):", *options_help(cls, width)]
        if ignored:
            blocks += ["", f"accepted from nanoGPT and ignored here: {', '.join('--' + k for k in ignored)}"]
    blocks += ["", "--debug" + footer]
    return "\n".join(blocks).rstrip() + "\n"


def _command_lines(command: str, general: str) -> list[str]:
    """The lines of the general usage text about `command` (its entries and their continuation lines)."""
    lines, mine = [], False
    for line in general.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            mine = line.split()[0] == command
        if mine and line.strip():
            lines.append(line)
    return lines
