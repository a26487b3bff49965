"""The owning context's refusals.

No nft command runs here (unit tests run outside any lab namespace). The kernel's behaviour
is tested for real in tests/lab/test_lock_owner.py and tests/lab/test_daemon_flush.py; the
daemon's fallback where the owner flag is missing, in tests/unit/test_lock_guarded.py.
"""

from __future__ import annotations

import pytest

from supervisor.errors import SafetyError
from supervisor.lock.libnftables import Libnftables, OwnerUnavailable, condensed
from supervisor.lock.owner import OwningContext


def test_a_missing_library_is_reported_as_owner_unavailable():
    with pytest.raises(OwnerUnavailable, match=r"libnftables-absent\.so\.9 cannot be loaded"):
        Libnftables("libnftables-absent.so.9")


def test_opening_outside_a_lab_namespace_is_refused_in_lab_only_mode():
    with pytest.raises(SafetyError, match="refusing to install a lock here"):
        OwningContext.open("tunlock")


def test_an_error_libnftables_repeats_for_every_message_is_said_once_with_its_count() -> None:
    """A transaction refused whole (its table owned by another program) came back as ~100 copies
    of one error in the log; a different error after it still shows, command and carets kept."""
    refused = "Error: Could not process rule: Operation not permitted\nadd table inet t { flags owner; }\n"
    text = (refused + "^^^^^\n") * 97 + "Error: No such file or directory\nadd rule inet t c x\n          ^\n"
    assert condensed(text) == (
        "Error: Could not process rule: Operation not permitted (97 times)\n"
        "add table inet t { flags owner; }\n^^^^^\n"
        "Error: No such file or directory\nadd rule inet t c x\n          ^"
    )
    single = "Error: syntax error, unexpected junk\nfoo bar\n    ^^^"
    assert condensed(single) == single
