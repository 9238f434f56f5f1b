"""``tritium serve --tp N``: rank 0 serves HTTP over a TPEngine; the other ranks follow its steps.

Every rank runs the same tritium.distributed.TPEngine on its shard, and the engine's scheduling is deterministic,
so the ranks stay in step if they see the same requests and aborts in the same order before the same steps. Rank 0's
``TPLeaderWorker`` (an EngineWorker) records every add_request and abort it applies and, before each step,
broadcasts them with the step (``torch.distributed.broadcast_object_list``); while idle it broadcasts an empty
tick every half second, so the followers, waiting in that broadcast, never reach the process group's timeout.
``follow(engine)`` is the other ranks' loop: apply what rank 0 applied, step when it steps, return when it stops.
"""
from __future__ import annotations

import queue
import traceback
from typing import List, Optional

import torch.distributed as dist

from .worker import EngineWorker

_TICK_S = 0.5


def _exchange(msg: Optional[tuple], group=None) -> tuple:
    box = [msg]
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class TPLeaderWorker(EngineWorker):
    """EngineWorker for rank 0 of a tensor-parallel server: the same loop, with every engine-changing operation
    and every step broadcast to the followers (see the module docstring)."""

    def __init__(self, engine, metrics=None, group=None):
        super().__init__(engine, metrics)
        self.group = group
        self._ops: List[tuple] = []
        self._added = 0

    def _handle(self, item: tuple) -> None:
        if item[0] == "add":
            sub = item[1]
            sub.tp_index = self._added
            self._added += 1
            # the followers add it too (and fail it the same way when the engine refuses it)
            self._ops.append(("add", list(sub.prompt_ids), sub.max_new_tokens, dict(sub.kwargs)))
        elif item[0] == "abort":
            sub = item[1]
            if sub.request is not None and sub.request.id in self._active:
                self._ops.append(("abort", sub.tp_index))
        super()._handle(item)

    def _sync(self, step: bool) -> None:
        ops, self._ops = self._ops, []
        _exchange(("ops", ops, step), self.group)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    block = not self.engine.has_work()
                    while True:
                        try:
                            item = self._inbox.get(block=block, timeout=_TICK_S if block else None)
                        except queue.Empty:
                            break
                        block = False
                        self._handle(item)
                    self._flush()
                    step = self.engine.has_work()
                    self._sync(step)
                    if step:
                        self.engine.step()
                        self._after_step()
                        self._flush()
                        if self.metrics is not None:
                            self.metrics.engine_state(self.engine)
                except Exception:   # as EngineWorker: fail everything in flight (a collective failed: so do the ranks)
                    self.error = traceback.format_exc(limit=3)
                    for sub in list(self._active.values()):
                        self._send(sub, "error", "the engine failed: " + self.error.strip().splitlines()[-1])
                    self._active.clear()
                    self._flush()
                    return
        finally:
            if self.error is None:
                _exchange(("stop",), self.group)


def follow(engine, group=None) -> None:
    """The loop of a rank other than 0: apply rank 0's adds and aborts, step when it steps; returns when rank 0's
    worker stops. A failing step raises (rank 0's fails with the same collective)."""
    reqs = {}    # rank 0's count of adds -> the request (unfinished ones)
    added = 0
    while True:
        msg = _exchange(None, group)
        if msg[0] == "stop":
            return
        _, ops, step = msg
        for op in ops:
            if op[0] == "add":
                try:
                    reqs[added] = engine.add_request(op[1], max_new_tokens=op[2], **op[3])
                except (ValueError, TypeError):   # rank 0's engine refused it the same way
                    pass
                added += 1
            elif op[1] in reqs:
                engine.abort(reqs.pop(op[1]))
        if step:
            engine.step()
            for k in [k for k, r in reqs.items() if r.done]:
                del reqs[k]
