"""A run of the daemon in the lab as a picture: its states as bands, answered pings, the faults.

The demo writes one (``tunlock demo --png``); ``bench/report.py`` draws a failover's with it.
The data is plain JSON (``Timeline.save``/``load``), so a figure can be drawn again without a lab.
matplotlib is imported only to draw (it is in the ``plots`` extra that scripts/bootstrap installs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

STATE_COLOURS = {
    "blocked": "#d62728",
    "connecting": "#ff7f0e",
    "connected": "#2ca02c",
    "offline": "#7f7f7f",
    "stopped": "#1f1f1f",
}


@dataclass
class Timeline:
    began: float  # wall clock; every other time is seconds since it
    title: str = ""
    states: list[tuple[float, str, str | None]] = field(default_factory=list)  # (t, state, server)
    answers: list[float] = field(default_factory=list)  # answered pings through the tunnel
    marks: list[tuple[float, str]] = field(default_factory=list)  # (t, what was done)

    def mark(self, at_wall: float, what: str) -> None:
        self.marks.append((at_wall - self.began, what))

    def add_daemon_log(self, lines: list[str]) -> None:
        """The state changes a daemon logged (``--log-format json``)."""
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "state":
                at = datetime.fromisoformat(record["timestamp"]).timestamp() - self.began
                self.states.append((at, record["state"], record.get("server")))

    def add_answers(self, answered_at: tuple[float, ...]) -> None:
        self.answers.extend(t - self.began for t in answered_at)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Timeline:
        data = json.loads(path.read_text())
        return cls(
            began=data["began"],
            title=data["title"],
            states=[tuple(s) for s in data["states"]],
            answers=data["answers"],
            marks=[tuple(m) for m in data["marks"]],
        )

    def plot(self, path: Path, width: float = 11.0) -> None:
        """Draw the timeline into a PNG: state bands on top, pings below, faults as lines."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        end = max([t for t, *_ in self.states] + self.answers + [t for t, _ in self.marks] + [1.0]) + 0.5
        fig, (bands, pings) = plt.subplots(
            2, 1, figsize=(width, 3.8), sharex=True, gridspec_kw={"height_ratios": [1, 1.4]}
        )
        ordered = sorted(self.states)
        for (start, state, server), nxt in zip(ordered, [*ordered[1:], (end, "", None)], strict=True):
            bands.axvspan(start, nxt[0], color=STATE_COLOURS.get(state, "#bbbbbb"), alpha=0.85, lw=0)
            if nxt[0] - start > end / 25:
                label = f"{state}\n{server}" if server else state
                bands.text(
                    (start + nxt[0]) / 2, 0.5, label, ha="center", va="center", fontsize=7, color="white"
                )
        bands.set_yticks([])
        bands.set_ylabel("daemon", rotation=0, ha="right", va="center")
        pings.vlines(self.answers, 0, 1, color="#1f77b4", lw=0.6)
        pings.set_yticks([])
        pings.set_ylabel("pings\nanswered", rotation=0, ha="right", va="center")
        pings.set_xlabel("seconds")
        for at, what in self.marks:
            for axis in (bands, pings):
                axis.axvline(at, color="black", lw=0.8, ls="--")
            above = bands.get_xaxis_transform()
            bands.text(at, 1.05, what, rotation=30, ha="left", va="bottom", fontsize=7, transform=above)
        bands.set_xlim(0, end)
        if self.title:
            fig.suptitle(self.title, fontsize=10, y=0.98)
        fig.tight_layout(rect=(0, 0, 1, 0.88 if self.title else 0.92))
        fig.savefig(path, dpi=110)
        plt.close(fig)
