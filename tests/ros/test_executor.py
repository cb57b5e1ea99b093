"""m2vla_ros.executor: a callback waiting for a busy thread pool is submitted once, not per wake-up."""

from __future__ import annotations

import threading
import time
from collections import Counter

import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.task import Task

from m2vla_ros.executor import SingleSubmitMultiThreadedExecutor


def test_a_task_waiting_for_a_busy_pool_is_submitted_once_however_often_the_executor_wakes(ros_domain_id):
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=ros_domain_id)
    node = Node("m2vla_test_executor", context=context)
    release, busy = threading.Event(), threading.Semaphore(0)
    ran: list[float] = []

    def occupy_a_worker() -> None:
        busy.release()
        release.wait(10.0)

    for _ in range(2):  # both workers blocked: any other task has to wait in the pool's queue
        node.create_timer(0.001, occupy_a_worker, callback_group=MutuallyExclusiveCallbackGroup())
    node.create_timer(0.001, lambda: ran.append(time.monotonic()), callback_group=MutuallyExclusiveCallbackGroup())
    executor = SingleSubmitMultiThreadedExecutor(num_threads=2, context=context)
    submitted: Counter = Counter()
    submit = executor._executor.submit

    def counting_submit(fn, *args, **kwargs):
        for task in (fn, *args):  # stock rclpy submits the task itself, this executor a wrapper with it
            if isinstance(task, Task):
                submitted[task] += 1  # keyed by the object: it stays alive, its id is not reused
        return submit(fn, *args, **kwargs)

    executor._executor.submit = counting_submit
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert busy.acquire(timeout=10.0) and busy.acquire(timeout=10.0), "the workers never got busy"
        time.sleep(0.05)  # the third timer's task is ready and queued behind them
        for _ in range(300):  # stock rclpy 9.1 submits the queued task again on every one of these
            executor.wake()
            time.sleep(0.001)
        assert not ran, "a third callback ran although both workers were blocked"
        assert submitted and max(submitted.values()) == 1, f"a task was submitted {max(submitted.values())} times"
        release.set()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and len(ran) < 5:
            time.sleep(0.01)
        assert len(ran) >= 5, "the queued callback did not run once the workers were free"
        assert max(submitted.values()) == 1
    finally:
        release.set()
        executor.shutdown(timeout_sec=2.0)
        spinner.join(timeout=5.0)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
