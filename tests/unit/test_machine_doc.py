"""The transition table as documented: generated from the code, every handler's targets declared."""

from __future__ import annotations

import typing

import pytest

from supervisor.machine import actions as act
from supervisor.machine import core
from supervisor.machine.core import TRANSITIONS, describe, ignore, targets
from supervisor.machine.states import STATE_TYPES
from supervisor.machine.table_doc import BEGIN, DOC, END, section, splice


def test_the_documented_table_is_the_one_the_code_prints() -> None:
    assert section(DOC.read_text()) == describe(), (
        "docs/supervisor.md's transition table is stale: run `python -m supervisor.machine --write-doc`"
    )


def test_every_handler_in_the_table_declares_where_it_leads() -> None:
    for state_type, row in TRANSITIONS.items():
        for event_type, handler in row.items():
            declared = targets(handler, state_type)  # KeyError: no @leads_to on the handler
            assert declared, f"{handler.__name__} ({state_type.name}, {event_type.__name__}) declares nothing"
            assert set(declared) <= set(STATE_TYPES)


def test_ignore_stays_where_it_is_and_is_left_out_of_the_table() -> None:
    for state_type in STATE_TYPES:
        assert targets(ignore, state_type) == (state_type,)
    assert "Nothing to do in this state" not in describe()


def test_a_docstring_of_several_lines_is_one_whole_cell() -> None:
    doc = core.sample_while_connected.__doc__
    assert doc is not None and len(doc.strip().splitlines()) > 1
    row = next(line for line in describe().splitlines() if line.startswith("| connected | StatsRead |"))
    assert row.endswith(f" {doc.strip().splitlines()[-1].strip()} |")  # the last line too
    assert row.count("|") == 5


def test_splice_replaces_only_the_generated_section() -> None:
    page = f"intro\n{BEGIN}\nold table\n{END}\noutro\n"
    new = splice(page, "| new |")
    assert new.startswith("intro\n") and new.endswith("\noutro\n")
    assert section(new) == "| new |"
    with pytest.raises(ValueError, match="lacks the markers"):
        splice("a page without them", "| new |")


def test_every_action_names_who_carries_it_out() -> None:
    """The printed table says where each of the machine's decisions lands (the lock's one
    writer, the tunnel, the runtime): an action added without saying so fails here."""
    assert set(act.EXECUTED_BY) == set(typing.get_args(act.Action))
    assert "| ApplyLock |" in describe() and "lock/guarded.py" in describe()
