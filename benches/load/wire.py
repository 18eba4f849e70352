#!/usr/bin/env python3
"""Where the siege's steady fleet spends its time, from a loopback capture (stdlib only).

  python3 wire.py CAPTURE.pcap LEVEE_PORT BACKEND_PORT --label "quiet" [--header]

run.sh's siege mode (SIEGE_CAPTURE=1) records two tcpdump captures of the packets that
carry data to and from levee's port and the backend's, one in the quiet run and one in the
siege's second minute, and calls this once for each. The steady fleet's requests are
matched by their paths (`/v1/ROUTE/steady/N/K`, each sent once): when the request reached
levee's socket, when levee's copy reached the backend's, when the backend's answer
reached levee's socket, and when levee's answer reached the client's. The kernel stamps
each packet as it is sent, so the parts are free of the load generator's own delays:

- wire: client's request sent -> levee's answer sent (levee + backend; what the client
  measures, less its own wake-ups on the busy load core);
- levee: the two legs in levee (request in -> request out, answer in -> answer out),
  including waits for levee's one worker;
- backend: the backend nginx's time, on the load core.

Prints one Markdown table row per part (with --header, the table's header first), and
the slowest 1% by wire time split into the three parts. A Linux cooked or Ethernet
capture (`tcpdump -i lo` writes Ethernet) in microsecond or nanosecond pcap format.
"""
import argparse
import os
import re
import statistics
import struct
import sys
from collections import defaultdict, deque

from siege import pct  # beside this file: the siege's own percentile, so both reports agree

STEADY = re.compile(rb"^GET (/v1/\w+/steady/\d+/\d+) HTTP/1\.1\r\n")
ANSWER = b"HTTP/1.1 "


def packets(path):
    """(time s, source port, destination port, TCP payload) of each packet."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return
    magic = struct.unpack("<I", data[:4])[0]
    if magic not in (0xA1B2C3D4, 0xA1B23C4D):
        sys.exit(f"wire.py: {path} is not a little-endian pcap file (magic {magic:#x})")
    scale = 1e9 if magic == 0xA1B23C4D else 1e6
    link = struct.unpack("<I", data[20:24])[0]
    skip = {1: 14, 113: 16, 276: 20}.get(link)
    if skip is None:
        sys.exit(f"wire.py: link type {link} is not Ethernet or Linux cooked capture")
    off = 24
    while off + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack("<IIII", data[off:off + 16])
        pkt = data[off + 16:off + 16 + incl]
        off += 16 + incl
        ip = pkt[skip:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue  # IPv4 TCP only: levee and the backend listen on 127.0.0.1
        tcp = ip[(ip[0] & 0xF) * 4:]
        if len(tcp) < 20:
            continue
        sport, dport = struct.unpack(">HH", tcp[:4])
        yield sec + frac / scale, sport, dport, tcp[(tcp[12] >> 4) * 4:]


def trips(path, levee, backend):
    """For each steady request seen whole: (in, up, up answer, out) times."""
    t = {}
    pending_in = defaultdict(deque)  # client connection -> steady paths, in order
    pending_up = defaultdict(deque)  # levee's backend connection -> paths (None: not steady)
    for ts, sport, dport, pay in packets(path):
        if dport == levee:
            m = STEADY.match(pay)
            if m:
                pending_in[sport].append(m.group(1))
                t[m.group(1)] = [ts, None, None, None]
        elif sport == levee:
            if pay.startswith(ANSWER) and pending_in[dport]:
                t[pending_in[dport].popleft()][3] = ts
        elif dport == backend:
            if pay[:4] in (b"GET ", b"PUT ", b"POST", b"HEAD"):
                m = STEADY.match(pay)
                k = m.group(1) if m and m.group(1) in t else None
                pending_up[sport].append(k)
                if k is not None:
                    t[k][1] = ts
        elif sport == backend:
            if pay.startswith(ANSWER) and pending_up[dport]:
                k = pending_up[dport].popleft()
                if k is not None:
                    t[k][2] = ts
    return [v for v in t.values() if None not in v]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pcap")
    ap.add_argument("levee_port", type=int)
    ap.add_argument("backend_port", type=int)
    ap.add_argument("--label", default="")
    ap.add_argument("--header", action="store_true")
    a = ap.parse_args()
    if a.header:
        print("| window | part | steady requests | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
    if not os.path.exists(a.pcap):
        print(f"| {a.label} | (no capture: tcpdump wrote no {os.path.basename(a.pcap)}; its log is beside it) | 0 | | | | | |")
        return
    rows = trips(a.pcap, a.levee_port, a.backend_port)
    if not rows:
        print(f"| {a.label} | (no steady request seen whole in the capture) | 0 | | | | | |")
        return
    parts = {
        "wire (levee + backend)": [o - i for i, u, r, o in rows],
        "levee (both legs)": [(u - i) + (o - r) for i, u, r, o in rows],
        "backend": [r - u for i, u, r, o in rows],
    }
    for name, xs in parts.items():
        cells = " | ".join(f"{pct(xs, p) * 1e3:.3f}" for p in (50, 90, 99, 99.9))
        print(f"| {a.label} | {name} | {len(xs)} | {cells} | {max(xs) * 1e3:.3f} |")
    rows.sort(key=lambda r: r[3] - r[0])
    slow = rows[int(len(rows) * 0.99):]
    mean = lambda f: statistics.mean(f(r) for r in slow) * 1e3
    print(f"| {a.label} | slowest 1% by wire time ({len(slow)}), mean ms: levee before the backend "
          f"{mean(lambda r: r[1] - r[0]):.3f}, backend {mean(lambda r: r[2] - r[1]):.3f}, "
          f"levee after {mean(lambda r: r[3] - r[2]):.3f} | | | | | | |")


if __name__ == "__main__":
    main()
