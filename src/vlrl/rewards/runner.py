"""Run reward functions so that no completion can crash or stall training.

`RewardRunner.run(fn, completions, samples, kwargs)` returns one value per completion (float or None)
plus the number of items that ended None because the reward raised (``errors``) or ran past the time
limit (``timeouts``); cumulative counts per reward name are kept in `RewardRunner.stats`.

Two paths:

- in-process (``workers=0``, or a reward registered ``cheap=True`` while ``fast_path`` is on): the call
  runs in the caller's process; an exception becomes None and is counted. There is no preemptive
  time limit on this path (Python cannot interrupt arbitrary code from outside); the built-in
  rewards bound their own work (capped input sizes, linear scans, math-verify under a SIGALRM
  deadline when called from the main thread). ``fast_path=False`` sends cheap rewards to the pool
  too (tests use it).
- worker pool (``workers >= 1``): ``workers`` processes started with the "forkserver" method
  (else "spawn"; never "fork", which is unsafe in a process holding CUDA or threads), each with its own
  pipe. The batch is cut into chunks of ``chunk_size`` completions (keyword arguments that are lists as
  long as the batch, e.g. ``completion_lengths``, are sliced along); a chunk is one call with a time
  limit of ``timeout`` seconds. A worker past its deadline is killed (SIGKILL) and replaced; a worker
  that dies (segfault, out of memory) is replaced too. A chunk that times out, raises or returns a
  malformed result is retried one completion at a time, so a single bad item costs only its own value.
  Each worker's address space is capped at its start-up size + ``memory_limit_mb`` (RLIMIT_AS), so a
  runaway allocation raises MemoryError or kills only that worker. Rewards registered
  ``chunkable=False`` (batch-level) are sent as one call. Functions must be picklable (module-level);
  one that is not is run in-process with a warning. A user reward (``path.py:function`` /
  ``module:function``, `vlrl.rewards.user`) travels as that name and each worker loads it on its first call.

A malformed result is: not a list-like (a str, dict or generator is not), a length other than the number of
completions passed, or an item that is neither None nor a finite real number (bool counts as 0/1; NaN, inf and
strings are malformed). It is handled like an exception, on either path. Built-in and user rewards alike.

A runner is not thread-safe: use one per thread. Close it (or use it as a context manager) to stop
the workers; they are daemons, so they also die with the parent.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import numbers
import os
import signal
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

Outcome = tuple[Any, ...]  # ("ok", values) | ("error", message) | ("timeout",)


@dataclass
class RunResult:
    """Values of one reward over a batch and how many items failed by exception / time-out."""

    values: list[float | None]
    errors: int = 0
    timeouts: int = 0


@dataclass
class _Task:
    task_id: int
    start: int
    stop: int


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    started: float
    ready: bool = False
    busy: tuple[int, float] | None = None  # (task_id, deadline)


@dataclass
class RewardStats:
    """Cumulative counts for one reward name."""

    calls: int = 0
    items: int = 0
    errors: int = 0
    timeouts: int = 0


def _limit_memory(memory_limit_mb: int | None) -> None:
    if memory_limit_mb is None:
        return
    try:
        import resource

        with open("/proc/self/status") as status:
            vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
        limit = vm_kb * 1024 + memory_limit_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except Exception:  # not Linux / no permission: run without the cap
        pass


def _worker_main(conn: Connection, memory_limit_mb: int | None) -> None:
    """Worker loop: import the rewards (warm math-verify), report ready, then serve calls until None/EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us
    import vlrl.rewards  # noqa: F401  (registers the built-in rewards)
    from vlrl.rewards.mathcheck import warm_up

    warm_up()
    _limit_memory(memory_limit_mb)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, fn, completions, samples, kwargs = msg
        outcome = _call(fn, completions, samples, kwargs, catch=BaseException)
        try:
            conn.send((task_id, outcome))
        except Exception as exc:  # an unpicklable result
            conn.send((task_id, ("error", f"result not picklable: {type(exc).__name__}")))


def _call(
    fn: Callable[..., Any],
    completions: list[str],
    samples: list[Any],
    kwargs: dict[str, Any],
    catch: type[BaseException] = Exception,
) -> Outcome:
    try:
        return ("ok", fn(completions, samples, **kwargs))
    except catch as exc:
        return ("error", f"{type(exc).__name__}: {str(exc)[:300]}")


def _validate(values: Any, n: int) -> list[float | None] | None:
    """Values as floats/None, or None when the result is malformed (not a list of len `n` of real numbers or
    None; NaN and inf are malformed). numpy arrays and scalars are accepted."""
    if (
        isinstance(values, (str, bytes, dict))
        or not hasattr(values, "__len__")
        or not hasattr(values, "__iter__")
    ):
        return None
    items = list(values)
    if len(items) != n:
        return None
    out: list[float | None] = []
    for v in items:
        if v is None:
            out.append(None)
        elif isinstance(v, numbers.Real) and math.isfinite(float(v)):
            out.append(float(v))
        else:
            return None
    return out


def _finite_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(float(value))


def _malformed_reason(values: Any, n: int) -> str:
    """Why `_validate` refused `values` (for the log)."""
    if (
        isinstance(values, (str, bytes, dict))
        or not hasattr(values, "__len__")
        or not hasattr(values, "__iter__")
    ):
        return f"malformed result: returned a {type(values).__name__}, not a list of {n} values"
    items = list(values)
    if len(items) != n:
        return f"malformed result: {len(items)} values for {n} completions"
    bad = next((v for v in items if v is not None and not _finite_real(v)), None)
    return f"malformed result: {bad!r} is not a finite number or None"


def _slice_kwargs(kwargs: dict[str, Any], n: int, start: int, stop: int) -> dict[str, Any]:
    return {
        k: v[start:stop] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in kwargs.items()
    }


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except Exception:
            pass
    for w in workers:
        w.proc.join(timeout=1.0)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(timeout=1.0)
        w.conn.close()
    workers.clear()


class RewardRunner:
    """Calls rewards in-process or in a pool of killable worker processes; see the module doc."""

    def __init__(
        self,
        *,
        workers: int = 0,
        timeout: float = 10.0,
        chunk_size: int = 8,
        fast_path: bool = True,
        start_method: str | None = None,
        memory_limit_mb: int | None = 2048,
        startup_timeout: float = 120.0,
    ) -> None:
        if workers < 0 or chunk_size < 1 or timeout <= 0:
            raise ValueError(
                f"need workers >= 0, chunk_size >= 1, timeout > 0; got {workers}, {chunk_size}, {timeout}"
            )
        self.workers = workers
        self.timeout = float(timeout)
        self.chunk_size = chunk_size
        self.fast_path = fast_path
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout = startup_timeout
        methods = mp.get_all_start_methods()
        self.start_method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
        if self.start_method == "fork":
            raise ValueError(
                "start_method 'fork' is not allowed (unsafe with CUDA/threads); use forkserver or spawn"
            )
        self.stats: dict[str, RewardStats] = {}
        self._reported: set[str] = set()
        self._pool: list[_Worker] = []
        self._startup_failures = 0
        self._broken = False
        self._next_id = 0
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)

    # ----------------------------------------------------------------- public
    def run(
        self,
        fn: Callable[..., Any],
        completions: list[str],
        samples: list[Any],
        kwargs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        cheap: bool = False,
        chunkable: bool = True,
    ) -> RunResult:
        """Values of `fn` over the batch; exceptions and time-outs become None and are counted."""
        n = len(completions)
        if n != len(samples):
            raise ValueError(f"{n} completions but {len(samples)} samples")
        kwargs = dict(kwargs or {})
        key = name or str(getattr(fn, "__name__", "reward"))
        stats = self.stats.setdefault(key, RewardStats())
        stats.calls += 1
        stats.items += n
        result = RunResult(values=[None] * n)
        if n == 0:
            return result
        in_process = self.workers == 0 or self._broken or (cheap and self.fast_path)
        size = self.chunk_size if chunkable else n
        tasks = [_Task(self._new_id(), s, min(s + size, n)) for s in range(0, n, size)]
        # a batch-level (non-chunkable) reward cannot be retried item by item: its failure is final
        retry = self._execute_and_fill(
            tasks, fn, completions, samples, kwargs, result, in_process, final=not chunkable
        )
        singles = [_Task(self._new_id(), i, i + 1) for t in retry for i in range(t.start, t.stop)]
        self._execute_and_fill(singles, fn, completions, samples, kwargs, result, in_process, final=True)
        stats.errors += result.errors
        stats.timeouts += result.timeouts
        return result

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        _shutdown(self._pool)

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- helpers
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _execute_and_fill(
        self,
        tasks: list[_Task],
        fn: Callable[..., Any],
        completions: list[str],
        samples: list[Any],
        kwargs: dict[str, Any],
        result: RunResult,
        in_process: bool,
        final: bool,
    ) -> list[_Task]:
        """Run `tasks`, write good values into `result`; failed multi-item tasks are returned for retry
        (when not `final`), failed single items are counted as errors / time-outs."""
        n = len(completions)
        payloads = [
            (
                t.task_id,
                fn,
                completions[t.start : t.stop],
                samples[t.start : t.stop],
                _slice_kwargs(kwargs, n, t.start, t.stop),
            )
            for t in tasks
        ]
        outcomes = self._run_in_process(payloads) if in_process else self._run_in_pool(payloads)
        retry: list[_Task] = []
        for task in tasks:
            outcome = outcomes.get(task.task_id, ("error", "no result"))
            values = _validate(outcome[1], task.stop - task.start) if outcome[0] == "ok" else None
            if values is not None:
                result.values[task.start : task.stop] = values
            elif not final and task.stop - task.start > 1:
                retry.append(task)
            else:
                count = task.stop - task.start
                if outcome[0] == "timeout":
                    result.timeouts += count
                else:
                    result.errors += count
                if outcome[0] == "error":
                    reason = outcome[1]
                elif outcome[0] == "timeout":
                    reason = f"no result within the time limit of {self.timeout:g} s"
                else:
                    reason = _malformed_reason(outcome[1], count)
                name = str(getattr(fn, "__name__", fn))
                # the first failure of each reward is shown, so that a reward that always fails says why
                first = name not in self._reported
                self._reported.add(name)
                logger.log(
                    logging.WARNING if first else logging.DEBUG,
                    "reward %s failed on items %d..%d (counted, scored None): %s%s",
                    name,
                    task.start,
                    task.stop,
                    reason,
                    "; its further failures are logged at debug level" if first else "",
                )
        return retry

    @staticmethod
    def _run_in_process(payloads: list[tuple[Any, ...]]) -> dict[int, Outcome]:
        return {
            task_id: _call(fn, comps, samples, kwargs) for task_id, fn, comps, samples, kwargs in payloads
        }

    # ------------------------------------------------------------------- pool
    def _start_worker(self) -> _Worker:
        ctx: Any = mp.get_context(self.start_method)
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_worker_main, args=(child_conn, self.memory_limit_mb), daemon=True)
        proc.start()
        child_conn.close()
        return _Worker(proc=proc, conn=parent_conn, started=time.monotonic())

    def _replace(self, worker: _Worker) -> None:
        worker.proc.kill()
        worker.proc.join(timeout=2.0)
        worker.conn.close()
        index = self._pool.index(worker)
        self._pool[index] = self._start_worker()

    def _ensure_pool(self) -> None:
        while len(self._pool) < self.workers:
            self._pool.append(self._start_worker())

    def _on_startup_failure(self, worker: _Worker) -> None:
        self._startup_failures += 1
        if self._startup_failures > 3 * self.workers:
            logger.error("reward workers keep failing to start; running rewards in-process from now on")
            self._broken = True
        self._replace(worker)

    def _send(self, worker: _Worker, payload: tuple[Any, ...], outcomes: dict[int, Outcome]) -> bool:
        """Send `payload` to an idle worker; False if the worker is dead (payload must be re-queued)."""
        try:
            worker.conn.send(payload)
        except (OSError, EOFError):
            self._replace(worker)
            return False
        except Exception as exc:  # unpicklable function / samples: run here instead
            logger.warning("reward call not picklable (%s); running it in-process", type(exc).__name__)
            outcomes.update(self._run_in_process([payload]))
            return True
        worker.busy = (payload[0], time.monotonic() + self.timeout)
        return True

    def _receive(self, worker: _Worker, outcomes: dict[int, Outcome]) -> None:
        try:
            msg = worker.conn.recv()
        except Exception:  # died (EOF), or sent something unreadable
            if worker.busy is not None:
                outcomes[worker.busy[0]] = ("error", "worker process died")
            elif not worker.ready:
                self._on_startup_failure(worker)
                return
            self._replace(worker)
            return
        if isinstance(msg[0], str) and msg[0] == "ready":
            worker.ready = True
            self._startup_failures = 0
            return
        task_id, outcome = msg
        outcomes[task_id] = outcome
        worker.busy = None

    def _check_deadlines(self, outcomes: dict[int, Outcome]) -> None:
        now = time.monotonic()
        for worker in list(self._pool):
            if worker.busy is not None and now >= worker.busy[1]:
                outcomes[worker.busy[0]] = ("timeout",)
                self._replace(worker)
            elif not worker.ready and now >= worker.started + self.startup_timeout:
                self._on_startup_failure(worker)

    def _run_in_pool(self, payloads: list[tuple[Any, ...]]) -> dict[int, Outcome]:
        self._ensure_pool()
        queue = deque(payloads)
        outcomes: dict[int, Outcome] = {}
        while queue or any(w.busy is not None for w in self._pool):
            if self._broken:  # workers cannot start: finish in-process (logged once in _on_startup_failure)
                self.close()
                outcomes.update(self._run_in_process([p for p in payloads if p[0] not in outcomes]))
                return outcomes
            for worker in self._pool:
                if queue and worker.ready and worker.busy is None:
                    payload = queue.popleft()
                    if not self._send(worker, payload, outcomes):
                        queue.appendleft(payload)
            waiting = [w for w in self._pool if w.busy is not None or not w.ready]
            if not waiting:
                continue
            deadlines = [
                w.busy[1] if w.busy is not None else w.started + self.startup_timeout for w in waiting
            ]
            by_conn = {id(w.conn): w for w in waiting}
            for conn in wait([w.conn for w in waiting], timeout=max(0.0, min(deadlines) - time.monotonic())):
                self._receive(by_conn[id(conn)], outcomes)
            self._check_deadlines(outcomes)
        return outcomes
