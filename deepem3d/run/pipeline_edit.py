"""Setting keys of a pipeline file's section in place, its comments and layout kept.

A pipeline file is the user's: it carries their comments (the shipped ones explain every
choice), so `deepem3d tune --write` changes only the lines of the keys it sets. The section
is a block mapping (`segmentation:` and indented `key: value` lines) or an empty one
(`segmentation: {}`, `segmentation:` alone, `null`); a key's line keeps its indentation and
trailing comment, a missing key is added after the section's last key, a missing section at
the end of the file. Names may be quoted, and a `#` inside a quoted value is no comment. The
result is read back as `deepem3d run` reads it (a key given twice refused) and compared with
what the edit meant; when they differ (a flow mapping with keys, a key whose value is a
nested block, anything this does not read) `set_section_keys` raises ValueError, and the
caller rewrites the file whole instead.
"""

from __future__ import annotations

import re

import yaml

from deepem3d.run.pipeline import unique_keys_loader

_EMPTY_VALUE = r"(?P<empty>\{\s*\}|null|~)?"
#: a key, bare or quoted, and its scalar value: quoted (a `#` inside is no comment) or plain
_KEY = r"(?P<quote>[\"']?)(?P<key>[\w-]+)(?P=quote)"
_VALUE = r"""(?P<value>\s*(?:'(?:[^']|'')*'|"(?:[^"\\]|\\.)*"|[^'"\r\n]*?))"""


def _render(key: str, value) -> str:
    return yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False).strip()


def set_section_keys(text: str, section: str, values: dict) -> str:
    """`text` with `values` set in its top-level mapping `section`, every other line as it
    was; ValueError when the result would not read as that (see the module docstring)."""
    try:
        expected = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"not YAML: {err}") from None
    if not isinstance(expected, dict):
        raise ValueError("the file is not a mapping")
    present = expected.get(section) or {}
    if not isinstance(present, dict):
        raise ValueError(f"{section}: not a mapping")
    expected[section] = {**present, **values}
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    name = rf"(?P<name>\ufeff?(?P<q>[\"']?){re.escape(section)}(?P=q))"
    header = re.compile(rf"^{name}\s*:\s*{_EMPTY_VALUE}\s*(?P<comment>#.*)?$")
    start = next((i for i, line in enumerate(lines) if header.match(line.rstrip("\r\n"))),
                 None)
    if start is None:
        if any(re.match(rf"^{name}\s*:", line) for line in lines):
            raise ValueError(f"{section}: not a block mapping")
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += newline
        lines.append(f"{section}:{newline}")
        lines += [f"  {_render(k, v)}{newline}" for k, v in values.items()]
    else:
        found = header.match(lines[start].rstrip("\r\n"))
        if found.group("empty"):  # `{}` or null: the keys follow as a block
            comment = found.group("comment")
            lines[start] = (f"{found.group('name')}:"
                            f"{'  ' + comment if comment else ''}{newline}")
        end, last, indent = start + 1, start, None
        while end < len(lines):
            stripped = lines[end].strip()
            if stripped and not lines[end][0].isspace() and not stripped.startswith("#"):
                break  # the next top-level key
            if stripped and not stripped.startswith("#"):
                last = end
                if indent is None:
                    indent = lines[end][:len(lines[end]) - len(lines[end].lstrip())]
            end += 1
        indent = indent or "  "
        missing = dict(values)
        for i in range(start + 1, last + 1):
            match = re.match(rf"^{indent}{_KEY}\s*:{_VALUE}(?P<comment>\s+#.*)?\s*$",
                             lines[i].rstrip("\r\n"))
            if match and match.group("key") in missing:
                key = match.group("key")
                lines[i] = (f"{indent}{_render(key, missing.pop(key))}"
                            f"{match.group('comment') or ''}{newline}")
        if missing and not lines[last].endswith("\n"):  # the file's last line
            lines[last] += newline
        lines[last + 1:last + 1] = [f"{indent}{_render(k, v)}{newline}"
                                    for k, v in missing.items()]
    edited = "".join(lines)
    try:  # as `deepem3d run` reads it: a key given twice is an error there
        meant = yaml.load(edited, Loader=unique_keys_loader()) == expected
    except yaml.YAMLError:
        meant = False
    if not meant:
        raise ValueError(f"{section}: the edit does not read back as meant")
    return edited
