"""A set of background tasks owned by one object: started by name, failures logged, all awaited on close."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine

log = logging.getLogger(__name__)


class TaskSet:
    def __init__(self, owner: str, on_error: Callable[[asyncio.Task, BaseException], None] | None = None):
        self.owner = owner
        self._tasks: set[asyncio.Task] = set()
        self._on_error = on_error

    def spawn(self, coro: Coroutine, what: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.owner}:{what}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task %s failed", task.get_name(), exc_info=exc)
            if self._on_error is not None:
                self._on_error(task, exc)

    def others(self) -> list[asyncio.Task]:
        """Every task but the caller's own (a task may close its owner)."""
        me = asyncio.current_task()
        return [t for t in self._tasks if t is not me]

    async def aclose(self) -> None:
        pending = self.others()
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)

    def __bool__(self) -> bool:
        return bool(self._tasks)
