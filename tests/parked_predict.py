"""``magseg predict`` that parks itself mid-write, for the signal tests.

    python tests/parked_predict.py READY_FD predict-args...

Runs the real command, except that just before the second batch of the last stage is written
(the first batch's pixels are already in the ``.partial`` outputs, the stage maps in the
scratch directory) it writes one byte to the file
descriptor READY_FD and waits for a signal. The test reads that byte, so it sends its signal
while the run is certainly mid-write, however fast or slow the machine is. An alarm ends a
run that is never signalled, so a broken test cannot hang.
"""

from __future__ import annotations

import os
import signal
import sys

from magseg.cli.app import main

from magseg.run import streaming

PARKED_AT_BATCH = 2
NEVER_SIGNALLED_S = 300


def _park_before(batch: int, ready_fd: int):
    write = streaming.RasterSink.write
    calls = 0

    def parked(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == batch:
            os.write(ready_fd, b"!")
            os.close(ready_fd)
            signal.alarm(NEVER_SIGNALLED_S)
            signal.pause()  # returns only by the signal handler's exception (or kills us)
        return write(*args, **kwargs)

    return parked


if __name__ == "__main__":
    fd = int(sys.argv[1])
    streaming.RasterSink.write = _park_before(PARKED_AT_BATCH, fd)
    sys.argv = ["magseg", *sys.argv[2:]]
    main()
