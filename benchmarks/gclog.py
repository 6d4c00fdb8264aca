"""Run a Python program with its garbage collector's pauses logged: one line
per full (generation 2) collection, and per shorter one over 2 ms, as
``<unix time> <generation> <milliseconds>``.  curve.py runs our server
through it to find collection pauses that grow with the number of sockets.

    python gclog.py LOGFILE program.py [args...]
"""

import gc
import runpy
import sys
import time

log = open(sys.argv[1], "w", buffering=1)
started = [0.0]


def timed(phase: str, info: dict) -> None:
    if phase == "start":
        started[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - started[0]) * 1000
    if info["generation"] == 2 or ms > 2:
        log.write(f"{time.time():.3f} {info['generation']} {ms:.1f}\n")


gc.callbacks.append(timed)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
