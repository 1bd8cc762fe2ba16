"""Measured timelines: one run of each compiled graph under the profiler, with its exposed communication.

With ``options["profile"]=True`` every compiled region's second call (the first
compiles the backward) runs under ``torch.profiler``; its forward and, when it
has one, its backward are marked by ``moe_ascend:<graph>#<n>`` windows. In a
window, the timeline has three lanes, as the estimate has:

    comm     the process group's own events ("gloo:all_to_all" on its worker threads), or the issue and
             arrival an exchange on a receive-first group records (``runtime.exchange_group``): the transfer
    wait     the graph blocked in ``wait_tensor``: communication not hidden (exposed)
    compute  the rest of the window, minus the calls that issue collectives

``exposed_comm_s`` is the time in waits; ``hidden_fraction`` is ``1 - exposed / comm``.
Regions measured together share one profiler, stopped when the last window closes; when that is in a backward,
at the next call (the autograd engine gives its caller back the profiler state it had before the backward, so a
profiler stopped inside one would stay on and slow every later op): a graph's timeline is there after the call
that follows the measured one.
"""

from __future__ import annotations

import atexit
import functools
import itertools
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from moe_ascend.compiler.planner.cost_model import Timeline, TimelineEvent
from moe_ascend.runtime import exchange_group
from moe_ascend.runtime.traffic import backward_of

WINDOW = "moe_ascend:"
COLLECTIVE_CALL = "_c10d_functional::"
WAIT = "_c10d_functional::wait_tensor"
TRANSFER = ("gloo:", "nccl:", "hccl:")  # what the backends call their collectives' work in the profiler
RECEIVE_FIRST = exchange_group.TRANSFER_EVENT
MEASURED_CALL = 2


_measured: dict[str, Timeline] = {}  # "graph.role" -> its latest measured timeline


def measured_timelines() -> dict[str, Timeline]:
    """Every graph's latest measured timeline, by ``"<graph>.<role>"`` (a training script reads its exposed
    communication here)."""
    return dict(_measured)


def measuring(compiled: Callable, graph_name: str, on_measured: Callable[[str, Timeline], None]) -> Callable:
    """``compiled`` whose ``MEASURED_CALL``-th call is measured; ``on_measured(role, timeline)`` gets each graph's
    (and ``measured_timelines()`` keeps it)."""
    calls = 0
    backward: _Window | None = None

    def record(role: str, timeline: Timeline) -> None:
        _measured[f"{graph_name}.{role}"] = timeline
        on_measured(role, timeline)

    @functools.wraps(compiled)
    def run(*args):
        nonlocal calls, backward
        _Window.end_session()  # a session whose last window closed in a backward ends here, outside it
        calls += 1
        if backward is not None and not backward.opened:
            backward.abandon()  # that call's backward never ran
        backward = None
        if calls != MEASURED_CALL:
            return compiled(*args)
        forward = _Window(graph_name, "forward", record)
        forward.open()
        outputs = compiled(*args)
        grad_fn = backward_of(outputs)
        if grad_fn is None:
            forward.role = "inference"
        else:
            window = backward = _Window(graph_name, "backward", record)  # made before the forward closes: one session
            grad_fn.register_prehook(lambda *_: window.open())
            grad_fn.register_hook(lambda *_: window.close())
        forward.close()
        return outputs

    return run


class _Window:
    """A named span in the one profiler session shared by every window outstanding; the session stops, and its
    events are read, when the last of them closes."""

    session: profile | None = None
    outstanding = 0
    closed: list["_Window"] = []
    serial = itertools.count()

    def __init__(self, graph_name: str, role: str, on_measured: Callable[[str, Timeline], None]):
        self.label = f"{WINDOW}{graph_name}#{next(_Window.serial)}"  # graph names repeat across dump folders
        self.role = role
        self.on_measured = on_measured
        self.opened = self.abandoned = False
        self.handle = None
        _Window.outstanding += 1

    def open(self) -> None:
        if self.abandoned:
            return
        if _Window.session is None and torch._C._autograd._profiler_enabled():
            self.abandon()  # someone else's profiler is on (one per thread): this graph goes unmeasured
            return
        if _Window.session is None:
            _Window.session = profile(activities=[ProfilerActivity.CPU])
            _Window.session.__enter__()
        self.opened = True
        self.handle = torch.ops.profiler._record_function_enter_new(self.label, None)

    def close(self) -> None:
        if self.abandoned:
            return
        torch.ops.profiler._record_function_exit._RecordFunction(self.handle)
        _Window.closed.append(self)
        self._release()

    def abandon(self) -> None:
        if self.abandoned:
            return
        self.abandoned = True
        self._release()

    def _release(self) -> None:
        _Window.outstanding -= 1
        if _Window.outstanding or _Window.session is None:
            return
        if torch._C._current_graph_task_id() != -1:
            # Inside a backward: the autograd engine restores its caller's profiler state when the backward ends,
            # so a profiler stopped here would stay on (and slow every later op); the next call stops it.
            return
        _Window.end_session()

    @staticmethod
    def end_session() -> None:
        """Stop the session once every window closed, and hand each window its timeline."""
        if _Window.session is None or _Window.outstanding:
            return
        session, windows = _Window.session, _Window.closed
        _Window.session, _Window.closed = None, []
        session.__exit__(None, None, None)
        events = list(session.events())
        for window in windows:
            found = timeline_of(events, window.label)
            if found is not None:
                window.on_measured(window.role, found)


@atexit.register
def _stop_at_exit() -> None:
    """A session still on when the process ends (its next call never came) stops before the interpreter does: a
    profiler left running through finalization crashes it."""
    if _Window.session is not None:
        _Window.outstanding = 0
        _Window.end_session()


def timeline_of(events, label: str) -> Timeline | None:
    """The timeline of the profiler window ``label`` (None when the events have no such window)."""
    window = next((e for e in events if e.name == label), None)
    if window is None:
        return None
    start, end = window.time_range.start, window.time_range.end
    seconds = lambda t: (t - start) / 1e6  # noqa: E731  (the profiler's times are microseconds)
    inside = [e for e in events if e is not window and e.time_range.start < end and e.time_range.end > start]
    timeline = Timeline(step_s=seconds(end))
    calls = _outermost(e for e in inside if e.thread == window.thread and e.name.startswith(COLLECTIVE_CALL))
    now = start
    for call in calls + [None]:
        a, b = (call.time_range.start, call.time_range.end) if call is not None else (end, end)
        if a > now:
            timeline.events.append(TimelineEvent("compute", "compute", seconds(now), seconds(a)))
            timeline.compute_s += seconds(a) - seconds(now)
        if call is not None and call.name == WAIT:
            timeline.events.append(TimelineEvent("wait_tensor", "wait", seconds(a), seconds(b)))
            timeline.exposed_comm_s += seconds(b) - seconds(a)
        now = max(now, b)
    transfers = [(max(e.time_range.start, start), min(e.time_range.end, end), e.name) for e in inside
                 if e.thread != window.thread and e.name.startswith(TRANSFER)]
    for e in inside:  # exchanges on a receive-first group: their issue marks, and how long they took
        took = exchange_group.transfer_seconds.pop(e.name, None) if e.name.startswith(RECEIVE_FIRST) else None
        if took is not None:
            transfers.append((e.time_range.start, min(e.time_range.start + 1e6 * took, end), RECEIVE_FIRST))
    transfers.sort()
    covered = start
    for a, b, name in transfers:
        timeline.events.append(TimelineEvent(name, "comm", seconds(a), seconds(b)))
        timeline.comm_s += max(0.0, seconds(b) - seconds(max(a, covered)))  # overlapping transfers count once
        covered = max(covered, b)
    return timeline


def hidden_fraction(timeline: Timeline) -> float | None:
    """The share of the communication that compute hid (None without communication)."""
    return max(0.0, 1.0 - timeline.exposed_comm_s / timeline.comm_s) if timeline.comm_s > 0 else None


def _outermost(events) -> list:
    """The events not nested in an earlier one, in start order."""
    out = []
    for e in sorted(events, key=lambda e: e.time_range.start):
        if not out or e.time_range.start >= out[-1].time_range.end:
            out.append(e)
    return out
