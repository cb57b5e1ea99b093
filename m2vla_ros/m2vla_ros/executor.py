"""A MultiThreadedExecutor that submits a callback to its thread pool once, not once per wake-up.

rclpy's MultiThreadedExecutor (9.1 here) hands a ready callback to its thread pool and, on every
later wake-up until a worker has *started* it, yields the same task again, and submits it
again (ros2/rclpy#1452; fixed upstream by ros2/rclpy#1547, not in the wheels we can install).
Each duplicate also lands in a list the spinning thread scans on every wake-up. On a starved
machine the workers start late, duplicates pile up, the spinning thread holds the GIL to scan
them, and the workers start later still. Seen here: the policy node at 87 % CPU in that scan
for minutes with its three workers idle, its timers never run, its feature contract never sent
(a soak whose perception never computed a feature).

This executor remembers which tasks wait in the pool and submits a task again only once a
worker has taken it (a coroutine callback that awaits is resumed as before).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from rclpy.executors import (
    ConditionReachedException, ExternalShutdownException, MultiThreadedExecutor, ShutdownException, TimeoutException,
)
from rclpy.task import Task


class SingleSubmitMultiThreadedExecutor(MultiThreadedExecutor):
    def __init__(self, num_threads: int, **kwargs: Any) -> None:
        super().__init__(num_threads=num_threads, **kwargs)
        self._waiting_in_pool: set[Task] = set()  # submitted, not yet taken by a worker
        self._waiting_lock = threading.Lock()

    def _run_in_worker(self, task: Task) -> None:
        with self._waiting_lock:
            self._waiting_in_pool.discard(task)
        task()

    def _spin_once_impl(self, timeout_sec: Any = None, wait_condition: Callable[[], bool] = lambda: False) -> None:
        try:
            handler, _entity, _node = self.wait_for_ready_callbacks(timeout_sec, None, wait_condition)
        except (ExternalShutdownException, ShutdownException, TimeoutException, ConditionReachedException):
            return
        with self._waiting_lock:
            already_waiting = handler in self._waiting_in_pool
            if not already_waiting:
                self._waiting_in_pool.add(handler)
        if not already_waiting:
            self._executor.submit(self._run_in_worker, handler)
            self._futures.append(handler)
        for future in [f for f in self._futures if f.done()]:
            self._futures.remove(future)
            future.result()  # an exception a callback raised ends spin(), as in rclpy
