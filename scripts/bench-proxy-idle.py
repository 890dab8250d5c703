#!/usr/bin/env python3
"""Idle-client helper of scripts/bench-proxy.sh.

Opens N client connections to a pooler (startup, SCRAM-SHA-256 / MD5 / cleartext login, one
`select 1` each so every connection has been used), keeps them all open and idle, waits
--settle seconds, then prints the VmRSS of --pid (the pooler) before and with the clients, and
closes everything. Only the standard library: a raw protocol-3 client.

    bench-proxy-idle.py --port 6432 --user postgres --password PW --clients 2000 --pid 1234
"""

import argparse
import base64
import hashlib
import hmac
import os
import socket
import struct
import sys
import time

_salted_cache = {}


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for pid {pid}")


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk
    return bytes(buf)


def read_message(sock):
    head = recv_exact(sock, 5)
    tag, length = head[:1], struct.unpack("!i", head[1:])[0]
    return tag, recv_exact(sock, length - 4)


def send(sock, tag, body):
    sock.sendall(tag + struct.pack("!i", len(body) + 4) + body)


def error_text(body):
    fields = dict((f[:1], f[1:].decode(errors="replace")) for f in body.split(b"\0") if f)
    return f"{fields.get(b'S', '')} {fields.get(b'C', '')} {fields.get(b'M', '')}"


def scram_salted(password, salt, iterations):
    key = (salt, iterations)
    if key not in _salted_cache:
        _salted_cache[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return _salted_cache[key]


def login(host, port, user, password, database):
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    body = struct.pack("!i", 196608) + params
    sock.sendall(struct.pack("!i", len(body) + 4) + body)
    client_first_bare = server_first = None
    nonce = base64.b64encode(os.urandom(18)).decode()
    while True:
        tag, body = read_message(sock)
        if tag == b"E":
            raise ConnectionError(error_text(body))
        if tag == b"Z":
            break
        if tag != b"R":
            continue
        code = struct.unpack("!i", body[:4])[0]
        if code == 0:
            continue
        if code == 3:
            send(sock, b"p", password.encode() + b"\0")
        elif code == 5:
            inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
            send(sock, b"p", b"md5" + hashlib.md5(inner + body[4:8]).hexdigest().encode() + b"\0")
        elif code == 10:
            client_first_bare = f"n=,r={nonce}"
            first = ("n,," + client_first_bare).encode()
            send(sock, b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
        elif code == 11:
            server_first = body[4:].decode()
            attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
            salted = scram_salted(password, base64.b64decode(attrs["s"]), int(attrs["i"]))
            without_proof = f"c=biws,r={attrs['r']}"
            auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
            client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
            stored_key = hashlib.sha256(client_key).digest()
            signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
            proof = bytes(a ^ b for a, b in zip(client_key, signature))
            send(sock, b"p", f"{without_proof},p={base64.b64encode(proof).decode()}".encode())
        elif code == 12:
            continue
        else:
            raise ConnectionError(f"unsupported authentication request {code}")
    send(sock, b"Q", b"select 1\0")
    while True:
        tag, body = read_message(sock)
        if tag == b"E":
            raise ConnectionError(error_text(body))
        if tag == b"Z":
            return sock


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--database", default="postgres")
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--pid", type=int, required=True, help="the pooler whose RSS is measured")
    ap.add_argument("--settle", type=float, default=3.0)
    a = ap.parse_args()
    before = rss_kb(a.pid)
    socks = []
    t0 = time.monotonic()
    try:
        for i in range(a.clients):
            try:
                socks.append(login(a.host, a.port, a.user, a.password, a.database))
            except (OSError, ConnectionError) as e:
                raise SystemExit(f"client {i + 1} of {a.clients} to port {a.port}: {e}")
        took = time.monotonic() - t0
        time.sleep(a.settle)
        # Every connection must still be open (not dropped by the pooler meanwhile).
        for s in socks:
            s.setblocking(False)
            try:
                if s.recv(1, socket.MSG_PEEK) == b"":
                    raise SystemExit(f"port {a.port}: a client connection was closed while idle")
            except BlockingIOError:
                pass
        with_clients = rss_kb(a.pid)
        print(f"{a.clients} {before} {with_clients} {took:.1f}")
    finally:
        for s in socks:
            s.close()


if __name__ == "__main__":
    sys.exit(main())
