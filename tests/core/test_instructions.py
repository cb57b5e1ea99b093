"""Operator instructions: good text passes normalised; anything else is refused with a reason."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2vla_core.instructions import InstructionError, check_names_known_colours, clean_instruction


def test_a_normal_instruction_is_kept_with_whitespace_normalised():
    assert clean_instruction("  pick up the  red cube\n") == "pick up the red cube"


@pytest.mark.parametrize("bad, reason", [
    ("", "empty"),
    ("   \t\n ", "empty"),
    ("x" * (1 << 20), "bytes"),
    ("pick \x00 up", "control"),
    ("pick up the \ufffd cube", "undecodable"),
    ("bad \udcff surrogate", "undecodable"),
    (b"pick up".decode("latin-1").encode("utf-16"), "text"),
])
def test_bad_instructions_are_refused_with_a_reason(bad, reason):
    with pytest.raises(InstructionError, match=reason):
        clean_instruction(bad)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary().map(lambda b: b.decode("utf-8", errors="replace")), st.none(), st.integers()))
def test_any_input_is_either_clean_text_or_a_clear_refusal(value):
    try:
        out = clean_instruction(value, max_bytes=256)
    except InstructionError as exc:
        assert str(exc)
        return
    assert out and out == out.strip() and "  " not in out
    assert len(out.encode("utf-8")) <= 256


SCENE_COLOURS = frozenset({"red", "green", "blue", "yellow"})


@pytest.mark.parametrize("instruction, reason", [
    ("stop", "no_known_object"),
    ("do not move", "no_known_object"),
    ("pick up the cube", "no_known_object"),
    ("pick up the purple cube", "unknown_colour: instruction names purple"),
    ("put the red cube on the orange zone", "unknown_colour: instruction names orange"),
])
def test_an_instruction_that_names_no_object_of_the_scene_is_refused_so_the_arm_does_not_move(instruction, reason):
    with pytest.raises(InstructionError, match=reason):
        check_names_known_colours(instruction, SCENE_COLOURS)


def test_every_instruction_the_task_suite_generates_names_its_objects_by_known_colours():
    from m2vla_core.sim.tasks import TASKS

    for name, task in TASKS.items():
        for seed in range(30):
            check_names_known_colours(task.make_episode(seed).instruction, SCENE_COLOURS)
    check_names_known_colours("Stack the RED block on the Blue one.", SCENE_COLOURS)
