"""Dynamic batching: which queued rows go into the engine's next call. Pure (no threads, no engine).

The engine worker (``backend.service``) keeps every request it has taken from the queue as a ``Pending`` job: a
single ``/v1/analyze`` is one row, a ``/v1/analyze/batch`` (a sweep's slices) is several. Before each engine call it
takes what arrived meanwhile and asks ``plan_call`` for at most ``cap`` rows (the engine's ``max_batch``):

1. every waiting single-row request first, oldest first: an Analyze click joins the very next call, so it waits at
   most for the call in flight, however long the sweeps queued before it;
2. then the remaining rows of multi-row requests, oldest request first, each request's rows in order; a request
   larger than the cap is served over several calls, and single requests that arrive meanwhile go between them.

A request is answered as soon as its last row has come back, whatever else is still queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)  # identity: the same request may appear in several calls
class Pending:
    job: Any
    rows: int
    next_row: int = 0  # rows before this one were handed to the engine
    results: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.results:
            self.results = [None] * self.rows

    @property
    def left(self) -> int:
        return self.rows - self.next_row

    @property
    def single(self) -> bool:
        return self.rows == 1


def plan_call(pending: list[Pending], cap: int) -> list[tuple[Pending, int]]:
    """(request, row index) pairs for the next engine call, at most ``cap``; ``pending`` is in arrival order."""
    cap = max(1, int(cap))
    out: list[tuple[Pending, int]] = []
    for p in [p for p in pending if p.single and p.left] + [p for p in pending if not p.single and p.left]:
        take = min(p.left, cap - len(out))
        out.extend((p, p.next_row + k) for k in range(take))
        if len(out) >= cap:
            break
    return out


def waiting_rows(pending: list[Pending]) -> int:
    return sum(p.left for p in pending)
