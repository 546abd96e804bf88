"""A userspace stand-in for `tc netem delay`: two TUN devices and a relay that holds each packet.

For kernels built without sch_netem. Run as root:

    python tests/delay_line.py DEV_A DEV_B

It creates the TUN devices DEV_A and DEV_B (in the caller's network namespace), prints "ready", and
relays IP packets between them; the caller moves each device into its namespace and gives it an address
(point-to-point, no ARP). Every line on stdin sets the one-way delay in milliseconds (the round trip is
twice that); end of stdin stops the relay and the devices disappear. The relay runs at a real-time
priority when it may, so a busy machine does not add its scheduling delay to the link's.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
SPIN = 0.3e-3  # seconds before a packet is due that the relay stops sleeping and waits on the clock


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def relay(a: int, b: int, control: int) -> None:
    delay = 0.0
    peer = {a: b, b: a}
    queue: list[tuple[float, int, int, bytes]] = []  # (due, seq, out fd, packet); seq keeps FIFO order
    seq = 0
    buf = b""
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now + SPIN:
            due, _, fd, pkt = heapq.heappop(queue)
            while time.monotonic() < due:  # select's timer wakes up to ~0.1 ms late: spin the last stretch
                pass
            with contextlib.suppress(OSError):  # a device gone down drops the packet, as a wire would
                os.write(fd, pkt)
            now = time.monotonic()
        timeout = max(queue[0][0] - SPIN - now, 0.0) if queue else None
        ready, _, _ = select.select([a, b, control], [], [], timeout)
        for fd in ready:
            if fd == control:
                data = os.read(control, 4096)
                if not data:
                    return
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        delay = float(line) / 1e3
                continue
            arrived = time.monotonic()
            while True:
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                seq += 1
                heapq.heappush(queue, (arrived + delay, seq, peer[fd], pkt))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: delay_line.py DEV_A DEV_B", file=sys.stderr)
        return 2
    a, b = open_tun(argv[0]), open_tun(argv[1])
    with contextlib.suppress(OSError):  # real-time priority: precise timers on a loaded machine
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    print("ready", flush=True)
    relay(a, b, sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
