"""Setting a pipeline file's keys in place (deepem3d.run.pipeline_edit): comments and every
other line kept, the result reading as the edit meant, or a ValueError."""

from __future__ import annotations

import pytest
import yaml

from deepem3d.run.pipeline_edit import set_section_keys

VALUES = {"method": "mean", "threshold": 0.3, "dust_size": 20, "sigma": 0.0}


def unchanged_lines(before: str, after: str) -> list[str]:
    kept = set(after.splitlines())
    return [line for line in before.splitlines() if line not in kept]


def test_keys_are_replaced_in_place_with_their_comments_and_missing_ones_added():
    text = ("# my run\nversion: 1\nsegmentation:   # tuned on slab 3\n"
            "  method: watershed   # was the default\n  # a comment between keys\n"
            "  dust_size: 100\n\n# the meshes\nmeshes: {}\n")
    edited = set_section_keys(text, "segmentation", VALUES)
    assert yaml.safe_load(edited) == {"version": 1, "segmentation": VALUES, "meshes": {}}
    assert "  method: mean   # was the default\n" in edited
    assert unchanged_lines(text, edited) == ["  method: watershed   # was the default",
                                             "  dust_size: 100"]
    # the new keys follow the section's last key, before the comment of the next section
    assert edited.index("  threshold: 0.3") < edited.index("# the meshes")


@pytest.mark.parametrize("empty", ["{}", "", "null", "~"])
def test_an_empty_section_becomes_a_block_and_keeps_its_comment(empty):
    text = f"version: 1\nsegmentation: {empty}  # from the demo\ndownsample:\n  layers: [image]\n"
    edited = set_section_keys(text, "segmentation", VALUES)
    assert yaml.safe_load(edited) == {"version": 1, "segmentation": VALUES,
                                      "downsample": {"layers": ["image"]}}
    lines = edited.splitlines()
    assert lines[1] in ("segmentation:  # from the demo", "segmentation:   # from the demo")
    assert lines[2] == "  method: mean"


def test_a_missing_section_is_added_at_the_end():
    text = "version: 1  # first\noutput: run"  # no final newline
    edited = set_section_keys(text, "segmentation", {"method": "mean"})
    assert edited == "version: 1  # first\noutput: run\nsegmentation:\n  method: mean\n"


def test_a_section_indented_by_four_and_windows_line_ends_are_kept():
    text = "version: 1\r\nsegmentation:\r\n    method: watershed\r\n"
    edited = set_section_keys(text, "segmentation", {"method": "mean", "sigma": 1.0})
    assert edited == "version: 1\r\nsegmentation:\r\n    method: mean\r\n    sigma: 1.0\r\n"


def test_quoted_names_a_hash_in_a_value_and_a_missing_final_newline():
    """A quoted key or section is the same key (a second one appended would be a key given
    twice, which `deepem3d run` refuses); a `#` inside a quoted value is no comment; a last
    line without its newline gets one before keys are added after it."""
    text = ('\ufeff"segmentation":  # mine\n  "method": \'a #b\'  # why\n'
            "  threshold: 0.5#not-a-comment\n  chunk: 64")
    edited = set_section_keys(text, "segmentation", VALUES)
    assert edited == ('\ufeff"segmentation":  # mine\n  method: mean  # why\n'
                      "  threshold: 0.3\n  chunk: 64\n  dust_size: 20\n  sigma: 0.0\n")


@pytest.mark.parametrize("text", [
    "segmentation: {method: watershed}\n",  # a flow mapping with keys
    "segmentation:\n  method:\n    nested: 1\n",  # a value that is a block
    "segmentation: [1, 2]\n",
    "- a list\n",
    "segmentation:\n  method: watershed\nsegmentation:\n  sigma: 1\n",  # given twice
    "a: 1\n---\nsegmentation: {}\n",  # two documents
])
def test_what_it_cannot_edit_in_place_is_refused(text):
    with pytest.raises(ValueError):
        set_section_keys(text, "segmentation", {"method": "mean"})
