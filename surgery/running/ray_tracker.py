"""Which tasks of a Ray run have started, and in which process: a small actor the tasks report to.

Ray tells the driver when a task has *finished*, not when it starts; the progress bar's "running"
count comes from here. Every attempt is kept, so a task retried after its worker died shows two
process ids. This module imports nothing heavy: the actor's worker process loads it alone.
"""

from __future__ import annotations


class TaskTracker:
    """Started attempts, as ``(task key, process id)`` pairs in the order they were reported."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int]] = []

    def started(self, key: str, pid: int) -> None:
        """A task (an attempt of it) began in process ``pid``."""
        self.attempts.append((key, pid))

    def since(self, index: int) -> list[tuple[str, int]]:
        """The attempts reported after the first ``index`` (the driver polls with what it has seen)."""
        return self.attempts[index:]
