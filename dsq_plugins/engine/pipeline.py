"""The bucket pipeline every adapter drives, and the communication thread it runs on.

An adapter (the DDP hook, Horovod's optimizer, DeepSpeed's engine; next FSDP and ZeRO) finds its framework's
gradients and hands them over bucket by bucket; `BucketPipeline` does the rest, the same way for all of them:

    issue(b)     the worker pass of bucket b (here, or on the thread) and its uplink; then, on the thread, b's
                 server pass and downlink, and the finish of the bucket issued before b: decode its downlink into
                 its outputs and complete its future. A bucket's downlink travels while the next one's uplink does.
                 A bucket dense throughout (warm-up, auto's dense mode) has no downlink: it is averaged into its
                 outputs right after its all-reduce, and only its future waits for the finish.
    end_step()   the step's last bucket has been issued: the step advances at once (the next buckets belong to
                 the next step), its last finish and the closing of its counters are queued behind the rest.

Around it, the pieces every adapter needs: `plan_buckets` (tensors into buckets of at most `bucket_mb`, one dtype
and device each), `grad_or_zeros` (a parameter without a gradient sends zeros: every rank sends the same tensors),
`outputs_for` and `write_back` (the averages land in the gradients themselves where they can, else through a copy,
scaled as the framework's reduction would have been).

`CommThread`: one thread per pipeline serving its queue in FIFO order. Every rank therefore issues its downlinks in
bucket order, and its uplinks in the same order (on the hook's thread for DDP, with a process group of their own;
on this thread otherwise): no rank ever issues one group's collectives in another order. On CUDA the thread works
on a stream of its own, ordered after the caller's stream by an event recorded when the task was queued; futures
are CUDA-aware, so whoever waits on one waits for the stream work that produced its value, not for the host.
"""
import queue
import threading
from typing import Callable, Hashable, List, Optional, Sequence, Tuple

import torch

__all__ = ["BucketPipeline", "CommThread", "grad_or_zeros", "new_future", "outputs_for", "plan_buckets",
           "write_back"]

Item = Tuple[Hashable, torch.Tensor]


class _Task:
    __slots__ = ("fn", "future", "event", "device")

    def __init__(self, fn, future, event, device):
        self.fn, self.future, self.event, self.device = fn, future, event, device


def new_future(device: Optional[torch.device] = None) -> torch.futures.Future:
    """A future for a bucket: CUDA-aware on a GPU (its waiters wait for the stream work behind its value)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.futures.Future(devices=[device])
    return torch.futures.Future()


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
        future = new_future(device if cuda else None)
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


class _Issued:
    """A bucket issued and served (or queued to be), whose finish is not queued yet."""

    __slots__ = ("served", "outs", "done", "result", "device")

    def __init__(self, served, outs, done, result, device):
        self.served, self.outs, self.done, self.result, self.device = served, outs, done, result, device


class BucketPipeline:
    """Runs a `DoubleSqueezeCollective` over the buckets of each step in the order of the module docstring.

    Args:
        collective: the `DoubleSqueezeCollective` (bound to its communicators before the first `issue`).
        name: the communication thread's name.
        begin_on_thread: run each bucket's worker pass on the communication thread (Horovod, DeepSpeed: one
            thread issues every collective). False: on the caller's thread (DDP's hook, whose uplinks and
            downlinks go on two process groups), so that the uplink leaves before the hook returns.
    """

    def __init__(self, collective, name: str = "dsq-comm", begin_on_thread: bool = True):
        self.collective = collective
        self.name = name
        self.begin_on_thread = begin_on_thread
        self._thread: Optional[CommThread] = None
        self._behind: Optional[_Issued] = None

    def _submit(self, fn, device) -> torch.futures.Future:
        if self._thread is None:
            self._thread = CommThread(self.name)
        return self._thread.submit(fn, device if device is not None and device.type == "cuda" else None)

    def issue(self, items: Sequence[Item], outs: Optional[List[torch.Tensor]] = None,
              flat: Optional[torch.Tensor] = None, result=None) -> torch.futures.Future:
        """Issue one bucket: ``(key, flat gradient)`` items of one dtype and device, the averages written into
        `outs` (default: into the items themselves). `flat`: the buffer the items are views of (DDP's bucket).
        Returns a future completed once the bucket's averages are written: its value is `result` if given, else
        the outputs. The items stay untouched until then."""
        c = self.collective
        device = items[0][1].device
        if self.begin_on_thread:
            begun = self._submit(lambda: c.begin(items, flat), device).wait
        else:
            bex = c.begin(items, flat)
            begun = lambda: bex             # noqa: E731

        def serve():
            b = begun()
            c.serve(b)
            # a bucket dense throughout has no downlink to wait for: it ends now, while the next bucket's reduction
            # travels, not behind it (its future still completes in the finisher's order)
            return b, (None if b.awaits_downlink else c.end(b, outs))
        served = self._submit(serve, device)
        done = new_future(device)
        previous, self._behind = self._behind, _Issued(served, outs, done, result, device)
        if previous is not None:
            self._submit(self._finisher(previous), device)
        return done

    def end_step(self) -> torch.futures.Future:
        """The current step's buckets have all been issued: advance the collective's step and queue the last
        finish and the closing of the step's counters. Returns a future of the step's `RoundStats`.

        The step advances where the worker passes run, behind this step's last one and before the next step's
        first: at once on the caller's thread, or on the communication thread under `begin_on_thread`. The last
        bucket's future completes only once the step is closed, so that the framework's next step (which waits
        for it) starts with the policies' step-end bookkeeping done on every rank."""
        c = self.collective
        last, self._behind = self._behind, None
        if self.begin_on_thread:
            advance = c.advance_step
        else:
            step = c.advance_step()
            advance = lambda: step          # noqa: E731
        if last is None:
            return self._submit(lambda: c.close_step(advance()), None)
        return self._submit(self._finisher(last, advance), last.device)

    def _finisher(self, issued: _Issued, advance: Optional[Callable[[], int]] = None):
        """Decode `issued` into its outputs; with `advance`, then close the step it returns; then complete the
        bucket's future."""
        c = self.collective

        def finish():
            stats = None
            try:
                step = advance() if advance is not None else None
                bex, outs = issued.served.wait()      # re-raises an error of its worker or server pass
                if outs is None:
                    outs = c.end(bex, issued.outs)
                if step is not None:
                    stats = c.close_step(step)
            except BaseException as e:
                issued.done.set_exception(e)
                raise
            issued.done.set_result(outs if issued.result is None else issued.result)
            return stats
        return finish

    def drain(self) -> None:
        """Wait until everything issued so far has run."""
        if self._thread is not None:
            self._thread.drain()

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None


def plan_buckets(named: Sequence[Tuple[Hashable, torch.Tensor]], bucket_mb: float) -> List[List[int]]:
    """Positions of `named` in buckets of at most `bucket_mb` MiB (a larger tensor alone), one dtype and device
    per bucket, in the given order: a tensor joins the open bucket of its dtype and device, or opens the next."""
    limit = bucket_mb * 2 ** 20
    buckets: List[List[int]] = []
    open_ = {}                                   # (dtype, device) -> [bucket index, bytes]
    for i, (_, t) in enumerate(named):
        kind = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        cur = open_.get(kind)
        if cur is None or (cur[1] and cur[1] + nbytes > limit):
            cur = open_[kind] = [len(buckets), 0]
            buckets.append([])
        buckets[cur[0]].append(i)
        cur[1] += nbytes
    return buckets


def grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    """`p.grad`, made zeros first if backward gave `p` none: another rank may have one (a dynamic graph, an
    unused branch), and every rank must send the same tensors."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def outputs_for(grads: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Flat outputs for the averages of `grads`: the gradient itself where it is a plain contiguous tensor (the
    average lands in place), else a new tensor that `write_back` copies in."""
    return [g.view(-1) if not g.is_sparse and g.is_contiguous() else
            torch.empty(g.numel(), dtype=g.dtype, device=g.device) for g in grads]


def write_back(grads: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """Scale the averages by `scale` (what the framework's own reduction would have multiplied by) and copy those
    that did not land in place into their gradients (a sparse one becomes the sparse form of its average)."""
    for g, out in zip(grads, outs):
        if scale != 1.0:
            out.mul_(scale)
        if g.is_sparse:
            g.zero_().add_(out.view(g.shape).to_sparse())
        elif out.data_ptr() != g.data_ptr():
            g.copy_(out.view(g.shape))
