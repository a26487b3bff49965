"""``python -m supervisor.machine``: print the transition table; with ``--write-doc``, put it into
docs/supervisor.md between its markers instead (tests/unit/test_machine_doc.py checks the two)."""

import sys

from supervisor.machine.core import describe
from supervisor.machine.table_doc import DOC, splice

if sys.argv[1:] == ["--write-doc"]:
    DOC.write_text(splice(DOC.read_text(), describe()))
    print(f"wrote the transition table into {DOC}")
else:
    print(describe())
