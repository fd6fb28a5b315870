"""Preemption: a scheduler's signal or a person's Ctrl-C saves where the run is and leaves, every rank together
(docs/checkpoints.md)."""

import contextlib
import os
import signal
import sys
import time

import deepspeed.comm as dist
import numpy
import torch

from cifar10ds import launch, machine

CHECK_EVERY = 8  # optimizer steps between the ranks' agreement on a signal: one small all-reduce on the host
PREEMPTED = 75  # the exit status of a rank that was preempted and saved a checkpoint (EX_TEMPFAIL)


class Preemption:
    """A scheduler's SIGTERM or SIGUSR1 (SLURM, Kubernetes, DeepSpeed's launcher passing one on), or a person's
    Ctrl-C (SIGINT): the handler notes it and does nothing else, so a further signal, during the save too, changes
    nothing, but for a second Ctrl-C, which stops at once (KeyboardInterrupt; 'latest' never names a checkpoint
    being written). Made as the run starts, so that a signal during start-up is kept too. The ranks agree on it at
    a step boundary, every CHECK_EVERY steps and at each epoch's end, then save where they are and leave together
    with exit status PREEMPTED (run again with --resume), 128 + 2 after a Ctrl-C (a person's stop, which a batch
    script must not requeue), or 128 + the signal's number where there is no --save-dir and nothing was saved.
    After training, a Ctrl-C stops the final test at once; a scheduler's signal lets it finish (finish())."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # by precedence where ranks saw different ones
    PASSED_ON = 1.0  # seconds within which a second SIGINT is the first Ctrl-C passed on by a launcher (torchrun's)

    def __init__(self):
        self.signum = 0
        self.interrupted = None  # when the first SIGINT came
        self.previous = {signum: signal.signal(signum, self.note) for signum in self.SIGNALS}
        self.posted = None  # the last check's all-reduce, in flight, and the host memory it reduces
        self.group = None  # a gloo group of every rank, for that all-reduce on the host

    def note(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted is not None and time.monotonic() - self.interrupted > self.PASSED_ON:
                raise KeyboardInterrupt
            self.interrupted = self.interrupted or time.monotonic()
        if not self.signum or self.SIGNALS.index(signum) < self.SIGNALS.index(self.signum):
            self.signum = signum

    @contextlib.contextmanager
    def sigterm_ends_the_wait_for_peers(self):
        """SIGTERM's own action for the block, init_distributed: the process ends at once (exit 143), as nothing is
        trained yet. A rank waits for its peers there in C++, where no Python handler runs: where rank 0 never
        came (it failed), the launcher's SIGTERM that ends the run went unheard, and DeepSpeed's launcher and
        torchrun waited their 30 s before SIGKILL."""
        handler = signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, handler)

    def agreed(self):
        """The signal that reached any rank (0 if none), a Ctrl-C before the others, now: every rank must ask at
        the same step, where it waits for the others (an epoch's end)."""
        self.collected()  # a signal it carries is still noted: this one is newer
        self.post()
        return self.collected()

    def agreed_at(self, steps, steps_per_epoch):
        """At every CHECK_EVERY-th of the epoch's `steps` but its last (its end asks agreed()): the signal the
        ranks agreed on at the check before, else 0. Each check posts this rank's signal to an all-reduce of host
        memory that the next one reads, done by then: no rank waits for its device, nor for a peer less than a
        check behind. A signal stops the run at the second check after it."""
        if steps % CHECK_EVERY or steps >= steps_per_epoch:
            return 0
        agreed = self.collected()
        self.post()
        return agreed

    def post(self):
        """Start the all-reduce (MAX) of this rank's signal, by precedence, in host memory."""
        flag = numpy.array([len(self.SIGNALS) - self.SIGNALS.index(self.signum) if self.signum else 0], numpy.int32)
        work = None
        if dist.get_world_size() > 1:
            if self.group is None:  # gloo reduces host memory; NCCL and its kin only a device's
                self.group = dist.get_world_group() if torch.distributed.get_backend() == "gloo" else \
                    torch.distributed.new_group(backend="gloo")
            work = dist.all_reduce(torch.from_numpy(flag), op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.posted = work, flag

    def collected(self):
        """The signal of the last all-reduce posted, once done (0 if none is in flight)."""
        if self.posted is None:
            return 0
        work, flag = self.posted
        if work is not None:
            work.wait()
        self.posted = None
        precedence = int(flag[0])  # host memory, read by numpy: no tensor, no device
        return self.SIGNALS[len(self.SIGNALS) - precedence] if precedence else 0

    @staticmethod
    def stop(signum, save_dir, tag):
        """Say what was saved (`tag`, or None: nothing) and end every rank together."""
        by = "Interrupted by Ctrl-C (SIGINT)" if signum == signal.SIGINT else f"Preempted by {signal.Signals(signum).name}"
        status = PREEMPTED if tag and signum != signal.SIGINT else 128 + signum
        if tag:
            machine.stop(f"{by}: saved checkpoint {os.path.join(save_dir, tag)}; run again with --resume to continue "
                         f"from there (exit {status})", status=status)
        machine.stop(f"{by}: nothing saved, as there is no --save-dir (exit {status})", status=status)

    def close(self, *signums):
        """Give back the handlers this one replaced: of `signums`, or of every signal left."""
        for signum in signums or list(self.previous):
            signal.signal(signum, self.previous.pop(signum))

    def finish(self):
        """The run has finished: close, and say so where a scheduler's signal came after training's last
        agreement, which the final test was let finish (nothing was left to save; exit 0, nothing to requeue)."""
        self.close()
        if self.signum in (signal.SIGTERM, signal.SIGUSR1) and launch.rank() == 0:
            print(f"{signal.Signals(self.signum).name} came after training had finished: the final test ran to "
                  "its end, and the run ends as finished (exit 0)", file=sys.stderr, flush=True)
