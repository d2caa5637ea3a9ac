"""The secondary's polled wait for the next mirrored write (the receiving half of polled completion).

The sending half is :meth:`.receiver.FrameReceiver._poll_reply`: a lone small ``data.write`` polls its socket for
its reply instead of sleeping in the event loop. This is the other side's: after a system answers a small
mirrored host write inline, it polls its link sockets for the next frame for a short while, so that its vCPU
does not halt and need an interrupt to see the next write (on a VM that wake-up costs more than the round trip
itself; see docs/replication.md).
"""

from __future__ import annotations

import asyncio
import os
import select
import time
import weakref
from typing import Protocol

# The secondary's half (see Spinner): after it answers a small mirrored host write, a system polls its link
# sockets for the next frame for up to twice the usual time until one comes, at most this long, and serves it
# at once; it yields the CPU on every turn. A system's vCPU that would otherwise halt stays awake, so the next
# write is seen without a wake-up (and so are the host's and the primary's wake-ups on a VM; see
# docs/replication.md). Environment VSPEMU_LINK_SPIN_US overrides the time; 0 turns it off.
SPIN_SECONDS = float(os.environ.get("VSPEMU_LINK_SPIN_US", "300")) / 1e6


class Receiver(Protocol):
    """A connection as the spinner sees it (:class:`.connection.Connection`)."""

    def _receive_now(self) -> bool:
        """Receive and parse what the socket holds; False if this is not the moment."""
        ...


class Spinner:
    """The secondary's polled wait for the next mirrored write: one per event loop, over every connection.

    When a small ``data.write`` of a host write (not a copy) has been answered inline, the next receive
    callback ends by polling every connection's socket until a frame arrives or the budget is spent: twice the
    moving average of the time from such an answer to the next frame (so only a steady stream of mirrored
    writes, some thousands a second, is polled for), at most :data:`SPIN_SECONDS`. Each turn yields the CPU
    (``sched_yield``), so any other runnable thread on that CPU goes first. What arrives is served right there;
    if it was another such write, polling goes on after the event loop has had its turn (it is never starved).
    """

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Spinner] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Spinner:
        spinner = cls._by_loop.get(loop)
        if spinner is None:
            spinner = cls._by_loop[loop] = cls(loop)
        return spinner

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.poller = select.poll()
        self.conns: dict[int, Receiver] = {}
        self.armed = False  # a small mirrored write was just answered
        self.answered_at = 0.0
        self.gap = 1.0  # moving average, seconds from such an answer to the next frame's arrival
        self.resume_scheduled = False
        self.served = 0  # receives made while polling (for tests and curiosity)

    def add(self, fd: int, conn: Receiver) -> None:
        self.poller.register(fd, select.POLLIN)
        self.conns[fd] = conn

    def remove(self, fd: int, conn: Receiver) -> None:
        if self.conns.get(fd) is conn:
            del self.conns[fd]
            self.poller.unregister(fd)

    def answered(self) -> None:
        self.armed = True
        self.answered_at = time.perf_counter()

    def frame_arrived(self) -> None:
        if self.armed:
            self.armed = False
            self.gap += (time.perf_counter() - self.answered_at - self.gap) / 8

    def spin(self) -> None:
        if not self.armed or self.gap > SPIN_SECONDS:
            return
        end = self.answered_at + min(SPIN_SECONDS, 2 * self.gap)
        poll = self.poller.poll
        while not (ready := poll(0)):
            if time.perf_counter() >= end:
                return
            os.sched_yield()
        for fd, _event in ready:
            conn = self.conns.get(fd)
            if conn is not None and conn._receive_now():
                self.served += 1
        if self.armed and not self.resume_scheduled:  # another one answered: poll on after the loop's turn
            self.resume_scheduled = True
            self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self.resume_scheduled = False
        self.spin()
