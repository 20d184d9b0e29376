"""`CommThread`: one communication thread per process, serving exchanges in the order they were issued.

An integration issues a bucket's uplink where the bucket becomes ready (DDP: in the communication hook, on the
autograd thread) and hands the rest to this thread: wait for the uplink, run the server pass, issue the downlink,
wait for it, decode, complete the bucket's future. One thread and one FIFO queue per process means every rank
issues its downlinks in bucket order, on a process group of their own, while uplinks go on the hook's group in the
same order: no rank ever issues a group's collectives in a different order, whatever the number of buckets.

On CUDA the thread works on a stream of its own, ordered after the hook's stream by an event recorded when the
task was queued; futures are CUDA-aware (`torch.futures.Future(devices=...)`), so whoever waits on one waits for
the stream work that produced its value, not for the host.
"""
import queue
import threading
from typing import Callable, Optional

import torch

__all__ = ["CommThread"]


class _Task:
    __slots__ = ("fn", "future", "event", "device")

    def __init__(self, fn, future, event, device):
        self.fn, self.future, self.event, self.device = fn, future, event, device


class CommThread:
    """A daemon thread running queued callables in FIFO order; `submit` returns a future of each result."""

    def __init__(self, name: str = "dsq-comm"):
        self._queue: "queue.SimpleQueue[Optional[_Task]]" = queue.SimpleQueue()
        self._streams = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], object], device: Optional[torch.device] = None) -> torch.futures.Future:
        """Run `fn()` on the thread after everything submitted before; the future holds its result (or error).
        With a CUDA `device`, `fn` runs on the thread's stream, after the work queued so far on the caller's."""
        cuda = device is not None and torch.device(device).type == "cuda"
        future = torch.futures.Future(devices=[device]) if cuda else torch.futures.Future()
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        self._queue.put(_Task(fn, future, event, torch.device(device) if cuda else None))
        return future

    def _stream(self, device):
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s

    def _run(self):
        while True:
            task = self._queue.get()
            if task is None:
                return
            try:
                if task.device is not None:
                    stream = self._stream(task.device)
                    with torch.cuda.device(task.device), torch.cuda.stream(stream):
                        stream.wait_event(task.event)
                        result = task.fn()
                        task.future.set_result(result)
                else:
                    task.future.set_result(task.fn())
            except BaseException as e:        # the waiting side re-raises it; later tasks still run
                if not task.future.done():
                    task.future.set_exception(e)

    def drain(self) -> None:
        """Wait until everything submitted so far has run."""
        self.submit(lambda: None).wait()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

