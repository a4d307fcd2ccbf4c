"""Setting keys of a pipeline file's section in place, its comments and layout kept.

A pipeline file is the user's: it carries their comments (the shipped ones explain every
choice), so `deepem3d tune --write` changes only the lines of the keys it sets. The section
is a block mapping (`segmentation:` and indented `key: value` lines) or an empty one
(`segmentation: {}`, `segmentation:` alone, `null`); a key's line keeps its indentation and
trailing comment, a missing key is added after the section's last key, a missing section at
the end of the file. The result is parsed and compared with what the edit meant; when they
differ (a flow mapping with keys, a key whose value is a nested block, anything this does not
read) `set_section_keys` raises ValueError and the caller rewrites the file whole instead.
"""

from __future__ import annotations

import re

import yaml

_EMPTY_VALUE = r"(?P<empty>\{\s*\}|null|~)?"


def _render(key: str, value) -> str:
    return yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False).strip()


def set_section_keys(text: str, section: str, values: dict) -> str:
    """`text` with `values` set in its top-level mapping `section`, every other line as it
    was; ValueError when the result would not read as that (see the module docstring)."""
    expected = yaml.safe_load(text) or {}
    if not isinstance(expected, dict):
        raise ValueError("the file is not a mapping")
    present = expected.get(section) or {}
    if not isinstance(present, dict):
        raise ValueError(f"{section}: not a mapping")
    expected[section] = {**present, **values}
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    name = re.escape(section)
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
            lines[start] = f"{section}:{'  ' + comment if comment else ''}{newline}"
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
            match = re.match(rf"^{indent}(?P<key>[\w-]+)\s*:(?P<value>[^#\r\n]*?)"
                             r"(?P<comment>\s+#.*)?$", lines[i].rstrip("\r\n"))
            if match and match.group("key") in missing:
                key = match.group("key")
                lines[i] = (f"{indent}{_render(key, missing.pop(key))}"
                            f"{match.group('comment') or ''}{newline}")
        lines[last + 1:last + 1] = [f"{indent}{_render(k, v)}{newline}"
                                    for k, v in missing.items()]
    edited = "".join(lines)
    try:
        meant = yaml.safe_load(edited) == expected
    except yaml.YAMLError:
        meant = False
    if not meant:
        raise ValueError(f"{section}: the edit does not read back as meant")
    return edited
