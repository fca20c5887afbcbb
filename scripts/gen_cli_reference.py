"""Writes docs/reference/cli.md from the command line's own parsers, so the reference cannot drift from the code.

Run after changing any flag:  python scripts/gen_cli_reference.py   (tests/test_docs.py fails while the file is stale)

The page is built from `phi3v_tune.cli.build_parser()` by walking its sub-commands: for each one its description and
every argument with its help, default and choices, in the order the parser defines them. Nothing depends on the
terminal (argparse's own help formatter wraps to COLUMNS), so the output is the same on every machine.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "reference" / "cli.md"
COMMAND = "python scripts/gen_cli_reference.py"

_TRAILING_DEFAULT = re.compile(r"\s*\(default: ([^()]*)\)\s*$")
_MD_SPECIAL = re.compile(r"([\\*_\[\]|#])")


def _escape(text: str) -> str:
    """Markdown-safe text in a table cell: code spans (`...`) stay as written, elsewhere characters that Markdown or
    HTML would read as markup (`*`, `_`, `<s>`, `|` ...) are escaped."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: treat the whole text as plain
        parts = [text.replace("`", "'")]
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append("`" + part.replace("|", "\\|") + "`")
        else:
            part = _MD_SPECIAL.sub(r"\\\1", part)
            out.append(part.replace("<", "&lt;").replace(">", "&gt;"))
    return "".join(out)


def _expand_help(action: argparse.Action, prog: str) -> str:
    """The help text as argparse prints it (its %(default)s-style fields filled in, %% -> %), on one line."""
    text = action.help or ""
    params = {k: v for k, v in dict(vars(action), prog=prog).items() if v is not argparse.SUPPRESS}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    if callable(params.get("type")):
        params["type"] = getattr(params["type"], "__name__", str(params["type"]))
    try:
        text = text % params
    except (KeyError, TypeError, ValueError):
        pass
    return " ".join(text.split())


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _metavar(action: argparse.Action) -> str:
    """What follows the flag, as argparse names it (a number's type instead of a placeholder); nothing for a switch."""
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        name = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif getattr(action.type, "__name__", "") in ("int", "float"):
        name = action.type.__name__.upper()
    else:
        name = action.dest.upper() if action.option_strings else action.dest
    if action.nargs == "?":
        return f"[{name}]"
    if action.nargs in ("+", "*"):
        return f"{name} [{name} ...]"
    if isinstance(action.nargs, int) and action.nargs > 1:
        return " ".join([name] * action.nargs)
    return name


def _row(action: argparse.Action, prog: str) -> str:
    help_text = _expand_help(action, prog)
    default = action.default
    if action.required:
        default_cell = "required"
    elif default is argparse.SUPPRESS or default is None:
        match = _TRAILING_DEFAULT.search(help_text)
        if match:  # the help states it (train's flags: their values may come from a recipe or a config file)
            default_cell = match.group(1)
            help_text = help_text[: match.start()].rstrip()
        else:
            default_cell = ""
    else:
        default_cell = _value(default)
        match = _TRAILING_DEFAULT.search(help_text)
        if match and match.group(1) == default_cell:  # said once, in its column
            help_text = help_text[: match.start()].rstrip()
    names = action.option_strings or [action.dest]
    flag = ", ".join(f"`{n}`" for n in names)
    meta = _metavar(action)
    if action.choices is not None:
        value = "one of " + ", ".join(f"`{c}`" for c in action.choices)
    elif not action.option_strings:
        value = ""  # a positional: its name says it
    else:
        value = f"`{meta}`" if meta else "switch"
    cells = [flag, value, _escape(default_cell) if default_cell else "", _escape(help_text)]
    return "| " + " | ".join(cells) + " |"


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each sub-command, in the order they were added."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # aliases point at the same parser
                    continue
                seen.add(id(sub))
                found.append((name, helps.get(name, ""), sub))
    return found


def _text(parser: argparse.ArgumentParser, text: str | None) -> str:
    if not text:
        return ""
    if issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter):
        return "```text\n" + text.strip("\n") + "\n```\n"
    return _escape(" ".join(text.split())) + "\n"


def _command(name: str, help_line: str, parser: argparse.ArgumentParser, level: int) -> list[str]:
    lines = [f"{'#' * level} `{name}`", ""]
    body = _text(parser, parser.description) or (_escape(help_line) + "\n" if help_line else "")
    if body:
        lines += [body]
    actions = [
        a
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.help is not argparse.SUPPRESS
    ]
    if not actions and not parser.add_help:
        lines += [f"This command reads its own flags: run `{name} --help`.", ""]
    for group in parser._action_groups:
        shown = [a for a in group._group_actions if a in actions]
        if not shown:
            continue
        title = (group.title or "options").strip()
        title = {"positional arguments": "Arguments", "options": "Options"}.get(title, title[:1].upper() + title[1:])
        lines += [f"**{_escape(title)}**", ""]
        if group.description:
            lines += [_escape(" ".join(group.description.split())), ""]
        first = "argument" if all(not a.option_strings for a in shown) else "flag"
        lines += [f"| {first} | value | default | what it does |", "|---|---|---|---|"]
        lines += [_row(a, name) for a in shown]
        lines += [""]
    for sub_name, sub_help, sub in _subparsers(parser):
        lines += _command(f"{name} {sub_name}", sub_help, sub, level + 1)
    return lines


def render(parser: argparse.ArgumentParser, prog: str = "phi3v-tune") -> str:
    """The whole reference page as Markdown."""
    lines = [
        "# Command reference",
        "",
        f"<!-- Generated from phi3v_tune.cli.build_parser() by scripts/gen_cli_reference.py: do not edit by hand, "
        f"run `{COMMAND}`. -->",
        "",
    ]
    if parser.description:
        lines += [_escape(" ".join(parser.description.split())), ""]
    lines += [
        "Every command also takes `-h` / `--help`. A flag's value may follow it after a space or an `=`.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    subs = _subparsers(parser)
    lines += [f"| [`{name}`](#{prog}-{name}) | {_escape(h)} |" for name, h, _ in subs]
    lines += [""]
    for name, help_line, sub in subs:
        lines += _command(f"{prog} {name}", help_line, sub, 2)
    return "\n".join(lines).rstrip("\n") + "\n"


def build() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from phi3v_tune.cli import build_parser

    return render(build_parser())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed page differs (write nothing)")
    args = parser.parse_args(argv)
    text = build()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.is_file() else ""
        if current != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
