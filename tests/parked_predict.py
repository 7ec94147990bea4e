"""``magseg predict`` that parks itself mid-write, for the signal tests.

    python tests/parked_predict.py READY_FD predict-args...

Runs the real command, except that just before the second window is segmented (the first
window's pixels are already in the ``.partial`` outputs) it writes one byte to the file
descriptor READY_FD and waits for a signal. The test reads that byte, so it sends its signal
while the run is certainly mid-write, however fast or slow the machine is. An alarm ends a
run that is never signalled, so a broken test cannot hang.
"""

from __future__ import annotations

import os
import signal
import sys

from magseg.cli.app import main

from magseg.io import predict

PARKED_AT_WINDOW = 2
NEVER_SIGNALLED_S = 300


def _park_before(window: int, ready_fd: int):
    segment_window = predict._segment_window
    calls = 0

    def parked(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == window:
            os.write(ready_fd, b"!")
            os.close(ready_fd)
            signal.alarm(NEVER_SIGNALLED_S)
            signal.pause()  # returns only by the signal handler's exception (or kills us)
        return segment_window(*args, **kwargs)

    return parked


if __name__ == "__main__":
    fd = int(sys.argv[1])
    predict._segment_window = _park_before(PARKED_AT_WINDOW, fd)
    sys.argv = ["magseg", *sys.argv[2:]]
    main()
