"""The supervisor's pure state machine: events in, actions out, no I/O (see ``core``)."""

from supervisor.machine.core import TRANSITIONS, describe, step
from supervisor.machine.settings import MachineSettings
from supervisor.machine.states import Machine

__all__ = ["TRANSITIONS", "Machine", "MachineSettings", "describe", "step"]
