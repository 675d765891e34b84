#!/usr/bin/env python3
"""Kamailio 5.6 sharing registrations through Outpost versus through DMQ (dmq + dmq_usrloc).

Setups (each started fresh for each scenario, on 127.0.0.1, free ports, a temporary directory):
  outpost  two Outpost datacenters (QUIC link through a UDP fault proxy) + two Kamailios
           running kamailio-outpost.cfg
  dmq      two Kamailios running kamailio-dmq.cfg (DMQ link through the same kind of proxy)

Scenarios (SIPp REGISTER load, sipp/register-timed.xml):
  steady   N users at R/s at A; a prober starts probing a user at B the moment SIPp sees its
           200 at A, re-probes only that user every ~5 ms until B answers 200; delay p50/p99,
           rate reaching B, users missing at B once quiet (every user probed once)
  restart  the same load; Kamailio A killed (SIGKILL, whole process group) mid-load and
           restarted; acknowledged registrations missing at B and at A afterwards, and the
           time from the restart until A routes a user registered before the kill
  cut      load at both A and B (R/2 each); the A-B link cut for CUT s, then healed; missing
           at each side, polled until none is missing or the deadline passes

Python 3 standard library only. Every child is killed on exit (also on Ctrl-C).
"""
import argparse
import asyncio
import collections
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
CHILDREN = []  # Popen objects, each the leader of its own process group
KAMAILIO_CHILDREN = 4  # --children: UDP worker processes of every Kamailio, both setups
SIPPS = []  # pids of running SIPp processes (asyncio children, each its own group)
PROBE_INTERVAL = 0.005
PROBE_TIMEOUT = 0.05
MAX_PROBE_RATE = 1500.0
SHM_MB = 64  # Kamailio's shared memory (-m); 64 MB is Kamailio's default


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def free_port(kind=socket.SOCK_DGRAM, used=set()):
    while True:
        s = socket.socket(socket.AF_INET, kind)
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p not in used:
            used.add(p)
            return p


def spawn(args, logpath, env=None, stdin=None, stdout=None):
    f = open(logpath, "ab")
    p = subprocess.Popen(args, stdin=stdin if stdin else subprocess.DEVNULL,
                         stdout=stdout if stdout else f, stderr=f, env=env,
                         start_new_session=True)
    CHILDREN.append(p)
    return p


def killpg(p, sig=signal.SIGKILL):
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    # the group's other processes (Kamailio's children) must be gone too
    for _ in range(200):
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    if p in CHILDREN:
        CHILDREN.remove(p)


def kill_all():
    for pid in list(SIPPS):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in list(CHILDREN):
        killpg(p)


# ---------------------------------------------------------------- the fault proxy (a child)

def proxy_child(a_port, b_port):
    """Two sockets: PA fronts A, PB fronts B. Sent to PB -> forwarded to B from PA; sent to PA
    -> forwarded to A from PB. So each side sees the other at the address it was configured
    with. stdin: 'cut', 'heal'. Prints 'PA PB' first."""
    sa = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (sa, sb):
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
    print(sa.getsockname()[1], sb.getsockname()[1], flush=True)
    cut = False
    fwd = drop = 0
    while True:
        r, _, _ = select.select([sa, sb, sys.stdin], [], [])
        for s in r:
            if s is sys.stdin:
                line = sys.stdin.readline()
                if not line:
                    return
                cut = line.strip() == "cut"
                sys.stderr.write("proxy: %s (forwarded %d, dropped %d)\n" % (line.strip(), fwd, drop))
                sys.stderr.flush()
                continue
            for _ in range(64):
                try:
                    data, _src = s.recvfrom(65536)
                except BlockingIOError:
                    break
                if cut:
                    drop += 1
                    continue
                fwd += 1
                try:
                    if s is sb:
                        sa.sendto(data, ("127.0.0.1", b_port))
                    else:
                        sb.sendto(data, ("127.0.0.1", a_port))
                except OSError:
                    pass


class Proxy:
    def __init__(self, d, a_port, b_port):
        self.p = spawn([sys.executable, os.path.abspath(__file__), "--proxy-child",
                        str(a_port), str(b_port)], os.path.join(d, "proxy.log"),
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        pa, pb = self.p.stdout.readline().split()
        self.pa, self.pb = int(pa), int(pb)

    def send(self, cmd):
        self.p.stdin.write((cmd + "\n").encode())
        self.p.stdin.flush()


# ---------------------------------------------------------------- SIP helpers

def sip_request(port, user=None, probe=False, register=None, wait=0.3, tries=10):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    lp = s.getsockname()[1]
    s.settimeout(wait)
    ruri = "sip:%s@127.0.0.1:%d" % (user, port) if user else "sip:127.0.0.1:%d" % port
    method = "REGISTER" if register else "OPTIONS"
    if register:
        ruri = "sip:127.0.0.1:%d" % port
    extra = "X-Outpost-Probe: 1\r\n" if probe else ""
    if register:
        extra += "Contact: <sip:%s@%s>\r\nExpires: 3600\r\n" % (user, register)
    to = "sip:%s@127.0.0.1" % user if user else ruri
    msg = ("%s %s SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-%d-%f\r\n"
           "From: <sip:t@127.0.0.1>;tag=%d\r\nTo: <%s>\r\nCall-ID: %d-%f@t\r\nCSeq: 1 %s\r\n"
           "Max-Forwards: 70\r\n%sContent-Length: 0\r\n\r\n"
           % (method, ruri, lp, lp, time.time(), lp, to, lp, time.time(), method, extra))
    try:
        for _ in range(tries):
            s.sendto(msg.encode(), ("127.0.0.1", port))
            try:
                while True:
                    d = s.recv(65536)
                    code = int(d[8:11])
                    if code >= 200:
                        return code
            except (socket.timeout, ValueError):
                continue
        return None
    finally:
        s.close()


async def wait_until(what, fn, deadline=60.0, every=0.2):
    t = time.time()
    while time.time() - t < deadline:
        if await asyncio.get_running_loop().run_in_executor(None, fn):
            return time.time() - t
        await asyncio.sleep(every)
    raise RuntimeError("timed out waiting for " + what)


# ---------------------------------------------------------------- Kamailio

class Kamailio:
    def __init__(self, d, cfg, local_name, local_text, files):
        self.d = d
        os.makedirs(os.path.join(d, "run"), exist_ok=True)
        for f in files + [cfg]:
            shutil.copy(os.path.join(HERE, f), d)
        with open(os.path.join(d, local_name), "w") as f:
            f.write(local_text)
        self.cfg = os.path.join(d, cfg)
        self.p = None

    def spawn(self):
        self.p = spawn(["kamailio", "-f", self.cfg, "-DD", "-E", "-m", str(SHM_MB), "-Y",
                        os.path.join(self.d, "run"), "-w", self.d],
                       os.path.join(self.d, "kamailio.log"))
        self.started = time.time()

    def kill9(self):
        killpg(self.p)

    def stop(self):
        if self.p:
            killpg(self.p, signal.SIGTERM)


# ---------------------------------------------------------------- setups

class Setup:
    name = "?"

    def cut(self):
        self.proxy.send("cut")

    def heal(self):
        self.proxy.send("heal")

    async def ready(self):
        for k in (self.ka, self.kb):
            port = k.port
            await wait_until("kamailio %d keepalive" % port, lambda: sip_request(port) == 200)
        # the link works both ways: a registration at each side routable at the other
        for src, dst, u in ((self.ka, self.kb, "warm-a"), (self.kb, self.ka, "warm-b")):
            await wait_until("%s registered" % u,
                             lambda: sip_request(src.port, u, register="127.0.0.1:5999") == 200)
            await wait_until("%s at the other side" % u,
                             lambda: sip_request(dst.port, u, probe=True) == 200, deadline=90)

    def stop(self):
        for k in (self.ka, self.kb):
            k.stop()
        for p in list(CHILDREN):
            killpg(p, signal.SIGTERM)

    def extra_report(self):
        return ""


class OutpostSetup(Setup):
    name = "outpost"

    def __init__(self, d, binary):
        self.d = d
        quic = [free_port(), free_port()]
        api = [free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)]
        self.proxy = Proxy(d, quic[0], quic[1])
        front = [self.proxy.pa, self.proxy.pb]
        names = ["dc-a", "dc-b"]
        ids = []
        for n in names:
            dd = os.path.join(d, n)
            out = subprocess.run([binary, "init", "--role", "datacenter", "--data-dir", dd,
                                  "--name", n], capture_output=True, text=True, check=True,
                                 env=self.env())
            fp = re.search(r"fingerprint:\s*([0-9a-f]{64})", out.stdout).group(1)
            tok = open(os.path.join(dd, "token")).read().strip()
            ids.append((dd, fp, tok))
        self.api = ["127.0.0.1:%d" % p for p in api]
        self.tokens = [i[2] for i in ids]
        self.nodes = []
        for i, n in enumerate(names):
            j = 1 - i
            cfg = os.path.join(d, n + ".toml")
            with open(cfg, "w") as f:
                f.write('role = "datacenter"\nname = "%s"\ndata_dir = "%s"\nlisten = "127.0.0.1:%d"\n'
                        'api = "%s"\n\n[log]\nlevel = "info"\n\n[[peers]]\nname = "%s"\n'
                        'addr = "127.0.0.1:%d"\nfingerprint = "%s"\n'
                        % (n, ids[i][0], quic[i], self.api[i], names[j], front[j], ids[j][1]))
            self.nodes.append(spawn([binary, "run", "--role", "datacenter", "--config", cfg],
                                    os.path.join(d, n + ".log"), env=self.env()))
        self.ka = self.kamailio("kamailio-a", 0)
        self.kb = self.kamailio("kamailio-b", 1)

    @staticmethod
    def env():
        e = dict(os.environ)
        e.pop("OUTPOST_TOKEN", None)
        e.pop("NOTIFY_SOCKET", None)
        return e

    def kamailio(self, name, i):
        d = os.path.join(self.d, name)
        os.makedirs(d)
        port = free_port()
        text = ('#!define LISTEN udp:127.0.0.1:%d\n#!define OUTPOST_API "http://%s"\n'
                '#!define OUTPOST_TOKEN "%s"\n#!define OUTPOST_JS "%s"\n#!define CHILDREN %d\n'
                % (port, self.api[i], self.tokens[i], os.path.join(d, "outpost.js"), KAMAILIO_CHILDREN))
        k = Kamailio(d, "kamailio-outpost.cfg", "outpost-local.cfg", text, ["outpost.js"])
        k.port = port
        k.spawn()
        return k

    def status(self, i):
        req = urllib.request.Request("http://%s/v1/status" % self.api[i],
                                     headers={"Authorization": "Bearer " + self.tokens[i]})
        with urllib.request.urlopen(req, timeout=2) as r:
            return json.loads(r.read())

    async def ready(self):
        for i in (0, 1):
            def ok(i=i):
                try:
                    return self.status(i).get("ready")
                except Exception:
                    return False
            await wait_until("outpost %d ready" % i, ok)
        await Setup.ready(self)

    def extra_report(self):
        try:
            s = [self.status(i) for i in (0, 1)]
            return "digests %s (entries %s)" % (
                "equal" if s[0]["digest"] == s[1]["digest"] else "DIFFER",
                [x["entries"] for x in s])
        except Exception as e:
            return "status unavailable: %s" % e


class DmqSetup(Setup):
    name = "dmq"

    def __init__(self, d):
        self.d = d
        dmq = [free_port(), free_port()]
        self.proxy = Proxy(d, dmq[0], dmq[1])
        front = [self.proxy.pa, self.proxy.pb]
        ks = []
        for i, name in enumerate(["kamailio-a", "kamailio-b"]):
            j = 1 - i
            kd = os.path.join(d, name)
            os.makedirs(kd)
            port = free_port()
            text = ('#!define LISTEN udp:127.0.0.1:%d\n#!define DMQ_LISTEN udp:127.0.0.1:%d\n'
                    '#!define DMQ_PORT %d\n#!define DMQ_ADVERTISE 127.0.0.1:%d\n'
                    '#!define DMQ_SERVER_ADDRESS "sip:127.0.0.1:%d"\n'
                    '#!define DMQ_SERVER_SOCKET "udp:127.0.0.1:%d"\n'
                    '#!define DMQ_NOTIFICATION_ADDRESS "sip:127.0.0.1:%d"\n#!define CHILDREN %d\n'
                    % (port, dmq[i], dmq[i], front[i], front[i], dmq[i], front[j], KAMAILIO_CHILDREN))
            k = Kamailio(kd, "kamailio-dmq.cfg", "dmq-local.cfg", text, [])
            k.port = port
            k.spawn()
            ks.append(k)
        self.ka, self.kb = ks


# ---------------------------------------------------------------- the prober

def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


class Prober(asyncio.DatagramProtocol):
    """Probes and SIPp's acknowledgements on one socket each."""

    def __init__(self):
        self.n = 0
        self.pending = {}  # probe id -> callback(code)
        self.acked = {}  # (side, user) -> time its 200 was seen by SIPp
        self.on_ack = None
        self.tokens = MAX_PROBE_RATE / 100
        self.last_fill = time.time()
        self.sent = 0
        self.sweep_codes = {}  # answers of the sweeps: code (None: no answer) -> count
        self.queue = collections.deque()  # chase probes due, sent at MAX_PROBE_RATE at most

    async def open(self):
        loop = asyncio.get_running_loop()
        self.tr, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        self.tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.port = self.tr.get_extra_info("sockname")[1]
        proto = AckProto(self)
        self.ack_tr, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=("127.0.0.1", 0))
        self.ack_tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.ack_port = self.ack_tr.get_extra_info("sockname")[1]
        self.drainer = asyncio.ensure_future(self.drain())

    async def drain(self):
        """Sends the due chase probes, at most MAX_PROBE_RATE a second: when more users wait
        than that allows, each one's re-probe interval stretches (reported as the interval p99)."""
        last = time.time()
        budget = 0.0
        while True:
            await asyncio.sleep(0.001)
            now = time.time()
            budget = min(MAX_PROBE_RATE / 50, budget + (now - last) * MAX_PROBE_RATE)
            last = now
            while self.queue and budget >= 1:
                budget -= 1
                self.queue.popleft()()

    def take_token(self):
        now = time.time()
        self.tokens = min(MAX_PROBE_RATE / 100, self.tokens + (now - self.last_fill) * MAX_PROBE_RATE)
        self.last_fill = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / MAX_PROBE_RATE

    def send(self, port, user, cb):
        self.n += 1
        pid = self.n
        self.pending[pid] = cb
        msg = ("OPTIONS sip:%s@127.0.0.1:%d SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-p%d\r\n"
               "From: <sip:prober@127.0.0.1>;tag=p%d\r\nTo: <sip:%s@127.0.0.1>\r\nCall-ID: p%d@prober\r\n"
               "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nX-Outpost-Probe: 1\r\nContent-Length: 0\r\n\r\n"
               % (user, port, self.port, pid, pid, user, pid))
        self.tr.sendto(msg.encode(), ("127.0.0.1", port))
        self.sent += 1
        return pid

    def datagram_received(self, data, addr):
        m = re.search(rb"\r\nCall-ID: *p(\d+)@prober", data, re.I)
        if not m or not data.startswith(b"SIP/2.0 "):
            return
        try:
            code = int(data[8:11])
        except ValueError:
            return
        if code < 200:
            return
        cb = self.pending.pop(int(m.group(1)), None)
        if cb:
            cb(code, time.time())

    # chase: probe one user at one Kamailio until it answers 200
    def chase(self, port, user, t0, results, priority=False):
        loop = asyncio.get_running_loop()
        st = {"t0": t0, "last": None, "intervals": [], "pid": None, "done": False, "n": 0}
        results["outstanding"] += 1

        def fire():
            if st["done"]:
                return
            if priority:
                send_now()
            else:
                self.queue.append(send_now)

        def send_now():
            if st["done"]:
                return
            now = time.time()
            if st["last"] is not None:
                st["intervals"].append(now - st["last"])
            st["last"] = now
            st["n"] += 1
            pid = self.send(port, user, answer)
            st["pid"] = pid
            loop.call_later(PROBE_TIMEOUT, timeout, pid)

        def answer(code, t):
            if st["done"]:
                return
            if code == 200:
                st["done"] = True
                results["outstanding"] -= 1
                results["delays"][user] = t - st["t0"]
                results["reached_at"].append(t)
                results["intervals"].extend(st["intervals"])
                results["probes"] += st["n"]
                return
            loop.call_later(max(0.0, st["last"] + PROBE_INTERVAL - time.time()), fire)

        def timeout(pid):
            if not st["done"] and st["pid"] == pid:
                self.pending.pop(pid, None)
                fire()

        fire()
        return st

    async def sweep(self, port, users, rate=500.0):
        """Probes every user once (again on timeout, up to 5 times): the users not routable."""
        loop = asyncio.get_running_loop()
        res = {}
        left = {"n": 0}
        done = loop.create_future()

        def one(u, tries):
            def cb(code, t):
                res[u] = code
                fin()
            pid = self.send(port, u, cb)

            def to():
                if pid in self.pending:
                    self.pending.pop(pid, None)
                    if tries < 5:
                        one(u, tries + 1)
                    else:
                        res[u] = None
                        fin()
            loop.call_later(0.3, to)

        def fin():
            left["n"] -= 1
            if left["n"] == 0 and not done.done():
                done.set_result(None)

        users = list(users)
        left["n"] = len(users)
        if not users:
            return set()
        for i, u in enumerate(users):
            one(u, 0)
            if i % 50 == 49:
                await asyncio.sleep(50 / rate)
        await done
        for c in res.values():
            self.sweep_codes[c] = self.sweep_codes.get(c, 0) + 1
        return {u for u, c in res.items() if c != 200}


class AckProto(asyncio.DatagramProtocol):
    def __init__(self, prober):
        self.prober = prober

    def datagram_received(self, data, addr):
        m = re.search(rb"\r\nX-User: *(\S+)", data)
        if m:
            u = m.group(1).decode()
            t = time.time()
            if u not in self.prober.acked:
                self.prober.acked[u] = t
                if self.prober.on_ack:
                    self.prober.on_ack(u, t)


def results_new():
    return {"outstanding": 0, "delays": {}, "reached_at": [], "intervals": [], "probes": 0}


async def sipp_load(d, prober, target_port, prefix, n, rate, tag):
    inf = os.path.join(d, "users-%s.csv" % tag)
    with open(inf, "w") as f:
        f.write("SEQUENTIAL\n")
        for i in range(n):
            f.write("%s%d;127.0.0.1:5999;3600;127.0.0.1;%d\n" % (prefix, i, prober.ack_port))
    args = ["sipp", "-sf", os.path.join(HERE, "sipp", "register-timed.xml"), "-inf", inf,
            "-m", str(n), "-r", str(rate), "-l", str(rate * 10), "-p", str(free_port()),
            "-nostdin", "-max_retrans", "5", "127.0.0.1:%d" % target_port]
    out = open(os.path.join(d, "sipp-%s.log" % tag), "wb")
    p = await asyncio.create_subprocess_exec(*args, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=out, start_new_session=True)
    SIPPS.append(p.pid)
    rc = await p.wait()
    SIPPS.remove(p.pid)
    return rc


async def wait_quiet(res, quiet=15.0, deadline=60.0):
    t = time.time()
    last = (len(res["delays"]), time.time())
    while res["outstanding"] > 0 and time.time() - t < deadline:
        await asyncio.sleep(0.5)
        if len(res["delays"]) != last[0]:
            last = (len(res["delays"]), time.time())
        elif time.time() - last[1] > quiet:
            break


# ---------------------------------------------------------------- scenarios

async def scen_steady(setup, prober, a):
    res = results_new()
    loop = asyncio.get_running_loop()
    kb = setup.kb.port
    prober.on_ack = lambda u, t: prober.chase(kb, u, t, res)
    t_start = time.time()
    await sipp_load(setup.d, prober, setup.ka.port, "s", a.users, a.rate, "steady")
    await wait_quiet(res)
    prober.on_ack = None
    acked = [u for u in prober.acked if u.startswith("s")]
    await asyncio.sleep(2)
    missing = await prober.sweep(kb, acked)
    ds = list(res["delays"].values())
    span = (max(res["reached_at"]) - min(prober.acked[u] for u in acked)) if res["reached_at"] else 0
    return {
        "acked at A": len(acked),
        "reached B (prober)": len(ds),
        "registrations/s reaching B": "%.0f" % (len(ds) / span) if span else "-",
        "delay p50 (ms)": "%.1f" % (1000 * pct(ds, 50)) if ds else "-",
        "delay p99 (ms)": "%.1f" % (1000 * pct(ds, 99)) if ds else "-",
        "delay max (ms)": "%.1f" % (1000 * max(ds)) if ds else "-",
        "re-probe interval p99 (ms)": "%.1f" % (1000 * pct(res["intervals"], 99)) if res["intervals"] else "-",
        "missing at B when quiet": len(missing),
    }


async def scen_restart(setup, prober, a):
    res = results_new()
    kb = setup.kb.port
    prober.on_ack = lambda u, t: prober.chase(kb, u, t, res)
    t_load = time.time()
    load = asyncio.ensure_future(sipp_load(setup.d, prober, setup.ka.port, "r", a.users, a.rate, "restart"))
    await asyncio.sleep(0.4 * a.users / a.rate)
    before = [u for u in prober.acked if u.startswith("r")]
    setup.ka.kill9()
    t_kill = time.time()
    setup.ka.spawn()
    t_restart = time.time()
    # A routes again: the first and the last user acknowledged before the kill
    back = results_new()
    for u in (before[0], before[-1]):
        # not behind the queue of B's chases: these few go out at once
        prober.chase(setup.ka.port, u, t_restart, back, priority=True)
    keepalive = t_restart + await wait_until("restarted A", lambda: sip_request(setup.ka.port, wait=0.05) == 200, 60, 0.01)
    await wait_quiet(back, quiet=60, deadline=120)
    await load
    await wait_quiet(res)
    prober.on_ack = None
    acked = [u for u in prober.acked if u.startswith("r")]
    await asyncio.sleep(2)
    miss_b = await prober.sweep(kb, acked)
    miss_a = await prober.sweep(setup.ka.port, acked)
    miss_a_before = len(set(before) & miss_a)
    rb = back["delays"]
    return {
        "acked at A": len(acked),
        "acked at A before the kill": len(before),
        "killed at (s into load)": "%.1f" % (t_kill - t_load),
        "missing at B when quiet": len(miss_b),
        "missing at A when quiet (of which acked before the kill)": "%d (%d)" % (len(miss_a), miss_a_before),
        "restart to A routes a pre-kill user (s), first / last": " / ".join(
            "%.2f" % rb[u] if u in rb else "never" for u in (before[0], before[-1])),
        "restart to A answers a keepalive (s)": "%.2f" % (keepalive - t_restart),
    }


async def scen_cut(setup, prober, a):
    half = max(1, a.rate // 2)
    n = int(half * a.cut_load)
    t_cut_at = (a.cut_load - a.cut) / 2.0
    la = asyncio.ensure_future(sipp_load(setup.d, prober, setup.ka.port, "ca", n, half, "cut-a"))
    lb = asyncio.ensure_future(sipp_load(setup.d, prober, setup.kb.port, "cb", n, half, "cut-b"))
    await asyncio.sleep(t_cut_at)
    setup.cut()
    log("%s: link cut" % setup.name)
    await asyncio.sleep(a.cut)
    setup.heal()
    t_heal = time.time()
    log("%s: link healed" % setup.name)
    await la
    await lb
    acked_a = [u for u in prober.acked if u.startswith("ca")]
    acked_b = [u for u in prober.acked if u.startswith("cb")]
    miss_b = set(acked_a)
    miss_a = set(acked_b)
    converged = None
    while time.time() - t_heal < a.deadline:
        miss_b = await prober.sweep(setup.kb.port, miss_b)
        miss_a = await prober.sweep(setup.ka.port, miss_a)
        if not miss_a and not miss_b:
            converged = time.time() - t_heal
            break
        await asyncio.sleep(3)
    return {
        "acked at A / at B": "%d / %d" % (len(acked_a), len(acked_b)),
        "missing at B (registered at A)": len(miss_b),
        "missing at A (registered at B)": len(miss_a),
        "heal to no user missing (s)": "%.1f" % converged if converged is not None else
        "not within %d s" % a.deadline,
    }


SCENARIOS = [("steady", scen_steady), ("restart", scen_restart), ("cut", scen_cut)]


async def run_one(setup_name, scen_name, fn, a, base):
    d = tempfile.mkdtemp(prefix="%s-%s-" % (setup_name, scen_name), dir=base)
    log("starting %s for %s in %s" % (setup_name, scen_name, d))
    setup = OutpostSetup(d, a.outpost) if setup_name == "outpost" else DmqSetup(d)
    try:
        await setup.ready()
        prober = Prober()
        await prober.open()
        r = await fn(setup, prober, a)
        r["sweep answers (code: count)"] = ", ".join(
            "%s: %d" % ("none" if c is None else c, n) for c, n in sorted(prober.sweep_codes.items(), key=str))
        ok = 0
        for f in sorted(os.listdir(d)):
            if f.startswith("sipp-"):
                m = re.findall(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", open(os.path.join(d, f)).read())
                ok += int(m[-1]) if m else 0
        r["SIPp successful REGISTERs / 200s the prober was told of"] = "%d / %d" % (ok, len(prober.acked))
        extra = setup.extra_report()
        if extra:
            r["note"] = extra
        log("%s %s: %s" % (setup_name, scen_name, json.dumps(r)))
        return r
    finally:
        setup.stop()


async def main_async(a):
    base = tempfile.mkdtemp(prefix="compare-dmq-")
    results = {}
    t0 = time.time()
    try:
        for sn, fn in SCENARIOS:
            if a.scenarios and sn not in a.scenarios:
                continue
            for setup_name in a.setups:
                try:
                    results[(sn, setup_name)] = await run_one(setup_name, sn, fn, a, base)
                except Exception as e:
                    log("%s %s FAILED: %r" % (setup_name, sn, e))
                    results[(sn, setup_name)] = {"error": repr(e)}
    finally:
        kill_all()
        if a.keep:
            log("kept " + base)
        else:
            shutil.rmtree(base, ignore_errors=True)
    report = render(results, a, time.time() - t0)
    print(report)
    if a.out:
        with open(a.out, "w") as f:
            f.write(report)


def render(results, a, took):
    out = ["# Outpost vs DMQ: measured by compare-dmq.py", "",
           "Command: `%s`  " % " ".join(sys.argv),
           "Load: %d users at %d REGISTER/s at A (steady, restart); cut: %d/s at A and %d/s at B "
           "for %d s, the link cut for %d s in the middle; convergence deadline %d s.  " %
           (a.users, a.rate, a.rate // 2, a.rate // 2, a.cut_load, a.cut, a.deadline),
           "Run time: %.0f s. Started %s UTC." % (took, time.strftime("%Y-%m-%d %H:%M", time.gmtime(time.time() - took))),
           ""]
    for sn, _ in SCENARIOS:
        rows = {}
        order = []
        for s in a.setups:
            for k, v in results.get((sn, s), {}).items():
                if k not in rows:
                    order.append(k)
                    rows[k] = {}
                rows[k][s] = v
        if not order:
            continue
        out.append("## %s" % sn)
        out.append("")
        out.append("| | " + " | ".join(a.setups) + " |")
        out.append("|---|" + "---|" * len(a.setups))
        for k in order:
            out.append("| %s | %s |" % (k, " | ".join(str(rows[k].get(s, "")) for s in a.setups)))
        out.append("")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--proxy-child":
        proxy_child(int(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (1,500 users, 10 s cut)")
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--outpost", default="/tmp/outpost-bin/outpost", help="the outpost binary")
    ap.add_argument("--users", type=int, default=9000)
    ap.add_argument("--rate", type=int, default=300, help="REGISTER/s")
    ap.add_argument("--cut", type=int, default=30, help="seconds the link is cut")
    ap.add_argument("--cut-load", type=int, default=60, help="seconds of load in the cut scenario")
    ap.add_argument("--deadline", type=int, default=120, help="convergence deadline after healing (s)")
    ap.add_argument("--setups", default="outpost,dmq")
    ap.add_argument("--scenarios", default="", help="comma-separated subset of steady,restart,cut")
    ap.add_argument("--shm", type=int, default=64, help="Kamailio shared memory, MB (-m; default 64, Kamailio's)")
    ap.add_argument("--children", type=int, default=4, help="Kamailio UDP worker processes, both setups")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    if a.quick:
        a.users, a.cut, a.cut_load, a.deadline = 1500, 10, 20, 60
    global SHM_MB, KAMAILIO_CHILDREN
    SHM_MB = a.shm
    KAMAILIO_CHILDREN = a.children
    a.setups = a.setups.split(",")
    a.scenarios = [s for s in a.scenarios.split(",") if s]

    def on_signal(sig, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        asyncio.run(main_async(a))
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        kill_all()


if __name__ == "__main__":
    main()
