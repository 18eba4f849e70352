#!/usr/bin/env python3
"""Storm load for benches/load/run.sh (stdlib only).

  python3 storm.py PORT [--steady 1000] [--duration 12] [--bomb-start 2] [--bomb-max 512]

STEADY clients send 1 request/s each (header x-device-id: steady-N, every path
distinct), each on its own keep-alive connection, with a random phase. One bomb client
(x-device-id: bomb, distinct paths too) sends BOMB_START requests/s in its first second,
doubling every second up to BOMB_MAX/s, for the whole run (open loop: requests leave on
schedule over a pool of keep-alive connections, whatever the answers). All connections
are open before the clock starts. Prints one line of JSON with the results.
"""
import argparse
import asyncio
import json
import random
import time


class Conn:
    def __init__(self, reader, writer):
        self.r, self.w = reader, writer


async def connect(port):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    return Conn(r, w)


async def request(conn, path, dev):
    """One GET over a keep-alive connection -> (status, reason header)."""
    conn.w.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-device-id: {dev}\r\n\r\n".encode()
    )
    head = await conn.r.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, reason, chunked = 0, "", False
    for line in lines[1:]:
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if k == "content-length":
            length = int(v.strip())
        elif k == "x-levee-reason":
            reason = v.strip()
        elif k == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await conn.r.readuntil(b"\r\n")).split(b";")[0], 16)
            await conn.r.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await conn.r.readexactly(length)
    return status, reason


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--steady", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=12)
    ap.add_argument("--bomb-start", type=float, default=2)
    ap.add_argument("--bomb-max", type=float, default=512)
    ap.add_argument("--bomb-pool", type=int, default=64)
    a = ap.parse_args()

    steady_conns = []
    for i in range(0, a.steady, 100):
        steady_conns += await asyncio.gather(
            *(connect(a.port) for _ in range(i, min(a.steady, i + 100)))
        )
    bomb_idle = [await connect(a.port) for _ in range(8)]

    lat, st_ok, st_fail, st_codes = [], 0, 0, {}
    b = {"sent": 0, "ok": 0, "refused": 0, "error": 0, "first_refusal": None,
         "first_refusal_rate": None, "first_refusal_status": None, "reason": None}
    t0 = time.monotonic() + 0.2
    end = t0 + a.duration

    def bomb_rate(t):  # scheduled rate at t seconds after the start
        return min(a.bomb_max, a.bomb_start * 2 ** int(t))

    async def steady(n, conn):
        nonlocal st_ok, st_fail
        k = 0
        t = t0 + random.random()
        while t < end:
            await asyncio.sleep(max(0, t - time.monotonic()))
            s = time.monotonic()
            try:
                status, _ = await asyncio.wait_for(
                    request(conn, f"/steady/{n}/{k}", f"steady-{n}"), 5)
                lat.append(time.monotonic() - s)
                st_codes[status] = st_codes.get(status, 0) + 1
                if 200 <= status < 300:
                    st_ok += 1
                else:
                    st_fail += 1
            except Exception:
                st_fail += 1
                st_codes["error"] = st_codes.get("error", 0) + 1
                try:
                    conn = await connect(a.port)
                except Exception:
                    return
            k += 1
            t += 1.0

    async def bomb_one(k, when):
        conn = bomb_idle.pop() if bomb_idle else None
        try:
            if conn is None:
                conn = await connect(a.port)
            status, reason = await asyncio.wait_for(
                request(conn, f"/bomb/{k}", "bomb"), 5)
        except Exception:
            b["error"] += 1
            return
        if 200 <= status < 300:
            b["ok"] += 1
        else:
            b["refused"] += 1
            if b["first_refusal"] is None or when < b["first_refusal"]:
                b["first_refusal"] = when
                b["first_refusal_rate"] = bomb_rate(when)
                b["first_refusal_status"] = status
                b["reason"] = reason
        if len(bomb_idle) < a.bomb_pool:
            bomb_idle.append(conn)
        else:
            conn.w.close()

    async def bomb():
        tasks, k, t = [], 0, 0.0
        while t < a.duration:
            await asyncio.sleep(max(0, t0 + t - time.monotonic()))
            tasks.append(asyncio.ensure_future(bomb_one(k, t)))
            b["sent"] += 1
            k += 1
            t += 1.0 / bomb_rate(t)
        await asyncio.gather(*tasks)

    await asyncio.gather(bomb(), *(steady(i, c) for i, c in enumerate(steady_conns)))
    wall = time.monotonic() - t0
    total = st_ok + st_fail
    print(json.dumps({
        "wall_s": round(wall, 2),
        "steady_sent": total,
        "steady_ok": st_ok,
        "steady_success_pct": round(100 * st_ok / total, 2) if total else None,
        "steady_codes": {str(k): v for k, v in st_codes.items()},
        "steady_p50_ms": round(1000 * pct(lat, 50), 2) if lat else None,
        "steady_p99_ms": round(1000 * pct(lat, 99), 2) if lat else None,
        "bomb_sent": b["sent"],
        "bomb_ok": b["ok"],
        "bomb_refused": b["refused"],
        "bomb_errors": b["error"],
        "bomb_first_refusal_s": None if b["first_refusal"] is None else round(b["first_refusal"], 2),
        "bomb_rate_at_refusal": b["first_refusal_rate"],
        "bomb_refusal_status": b["first_refusal_status"],
        "bomb_refusal_reason": b["reason"],
    }))


if __name__ == "__main__":
    asyncio.run(main())
