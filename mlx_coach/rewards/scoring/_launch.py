"""Entry point of one sample: `python -I -B [-S] _launch.py REQUEST_FD CHANNEL_FD`.

Started by sandbox.py in the sample's private directory, never imported by the package. It forks
*before* reading anything: the child becomes the worker (_worker.py) and closes the trainer's
descriptors at once, so it never holds the nonce, the task's test or the verdict channel; the
parent becomes the judge (_judge.py), which then reads the request. Forking one interpreter costs
far less than starting a second one.
"""

import _socket  # not `socket`: its imports would lengthen every sample's start
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves the script's folder out
import _judge
import _worker

if sys.platform.startswith("linux"):
    import ctypes  # noqa: F401 - imported once here, not in both processes (prctl, unshare: _confine.py)

del sys.path[0]


def main():
    request_fd, channel_fd = int(sys.argv[1]), int(sys.argv[2])
    judge_end, worker_end = (s.detach() for s in _socket.socketpair())
    pid = os.fork()
    if pid == 0:
        os.close(request_fd)
        os.close(channel_fd)
        os.close(judge_end)
        _worker.main(worker_end)
    else:
        os.close(worker_end)
        _judge.main(request_fd, channel_fd, judge_end, pid)


if __name__ == "__main__":
    main()
