#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/seeds/<target>/ (run from anywhere).

Each seed is a small, valid (or deliberately borderline) input in the layout the target's doc
comment describes, so the fuzzer starts from real traffic instead of discovering the headers.
Re-running rewrites the same files.
"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def j(v):
    return json.dumps(v, separators=(",", ":")).encode()


def control(code, payload=b""):
    return struct.pack(">II", code, 8 + len(payload)) + payload


def io(seq, data=b""):
    return struct.pack(">QI", seq, 12 + len(data)) + data


def legacy(ftype, opcode, payload=b"", error=False, words=3):
    flags = ftype | (0x10 if error else 0)
    head = struct.pack(">HBBHBBI", 2, words, 0, 0, flags, opcode, len(payload))
    return head + b"\0" * (words * 4 - 12) + payload


def stream(channel, payload=b""):
    return struct.pack(">BI", channel, len(payload)) + payload


FULL = b"\xff"  # byte 0 = 0xff: the daemon's real frame limit
PROCESS = {"id": "p1", "args": ["sh", "-c", "echo hi"], "envs": [{"env": "A", "value": "1"}],
           "workdir": "/", "terminal": False, "stdio": 1, "stderr": 2}

# agent_control_frame: [limit, chunk, stream...]
write("agent_control_frame", "ready", FULL + b"\x03" + control(8))
write("agent_control_frame", "version-ack", FULL + b"\x05" + control(9, struct.pack(">I", 4244)))
write("agent_control_frame", "error-then-next", FULL + b"\x01" + control(10, b"bad") + control(14, struct.pack(">I", 512)))
write("agent_control_frame", "async-event", FULL + b"\x10" + control(23, j({"container": "c", "process": "p1", "event": "finished", "status": 0})))
write("agent_control_frame", "too-short", FULL + b"\x08" + struct.pack(">II", 9, 7))
write("agent_control_frame", "over-limit", b"\x04\x08" + control(6, b"x" * 40))

# agent_io_frame
write("agent_io_frame", "output-eof-status", FULL + b"\x07" + io(1, b"hello\n") + io(1) + io(1, b"\x00"))
write("agent_io_frame", "two-streams", FULL + b"\x0c" + io(3, b"out") + io(4, b"err") + io(3) + io(4))
write("agent_io_frame", "partial", FULL + b"\x02" + io(5, b"data")[:-2])
write("agent_io_frame", "too-short", FULL + b"\x01" + struct.pack(">QI", 1, 3))

# agent_payload: [dialect, code, payload...]
for d in (0, 1):
    write("agent_payload", f"version-{d}", bytes([d, 0]) + struct.pack(">I", 4242 + 2 * d))
    write("agent_payload", f"next-{d}", bytes([d, 14]) + struct.pack(">I", 256))
    write("agent_payload", f"newcontainer-{d}", bytes([d, 17]) + j({"id": "c", "process": PROCESS, "rootfs": "rootfs", "image": "busybox"}))
    write("agent_payload", f"execcmd-{d}", bytes([d, 6]) + j({"container": "c", "process": PROCESS}))
    write("agent_payload", f"killcontainer-{d}", bytes([d, 18]) + j({"container": "c", "signal": 15, "allProcesses": True}))
    write("agent_payload", f"startpod-{d}", bytes([d, 1]) + j({"hostname": "h", "shareDir": "rootfs"}))
write("agent_payload", "winsize-cc-agent", b"\x00\x0b" + j({"seq": 1, "row": 24, "column": 80}))
write("agent_payload", "winsize-hyperstart", b"\x01\x0b" + j({"container": "c", "process": "p1", "row": 24, "column": 80}))
write("agent_payload", "asyncevent-hyperstart", b"\x01\x17" + j({"container": "c", "process": "p1", "event": "finished", "status": 137}))
write("agent_payload", "signalprocess-hyperstart", b"\x01\x18" + j({"container": "c", "process": "p1", "signal": 9}))
write("agent_payload", "name-lookup", b"\x00\x0cpscontainer")

# legacy_frame: [limit, chunk, stream...]
write("legacy_frame", "register", FULL + b"\x0c" + legacy(0, 0, j({"containerId": "vm1", "ctlSerial": "/run/ctl.sock", "ioSerial": "/run/io.sock", "numIOStreams": 1})))
write("legacy_frame", "hyper-then-stdin", FULL + b"\x05" + legacy(0, 3, j({"hyperName": "ping"})) + legacy(2, 0, b"input\n") + legacy(2, 0))
write("legacy_frame", "error-response", FULL + b"\x20" + legacy(1, 2, j({"msg": "no such VM"}), error=True))
write("legacy_frame", "exit-notification", FULL + b"\x01" + legacy(3, 0, b"\x00"))
write("legacy_frame", "long-header", FULL + b"\x03" + legacy(2, 3, j({"source": "shim", "level": "info", "msg": "hi"}), words=5))
write("legacy_frame", "bad-opcode", FULL + b"\x0c" + legacy(0, 9))
write("legacy_frame", "version-only", FULL + b"\x01" + b"\x00\x02")

# legacy_payload: [kind, payload...]
write("legacy_payload", "registervm", b"\x00" + j({"containerId": "vm1", "ctlSerial": "/run/ctl.sock", "ioSerial": "unix:///run/io.sock", "console": "/run/console.sock", "numIOStreams": 2}))
write("legacy_payload", "attachvm", b"\x01" + j({"containerId": "vm1", "numIOStreams": 1}))
write("legacy_payload", "unregistervm", b"\x02" + j({"containerId": "vm1"}))
write("legacy_payload", "hyper-execcmd", b"\x03" + j({"hyperName": "execcmd", "tokens": ["tok"], "data": {"container": "c", "process": PROCESS}}))
write("legacy_payload", "connectshim", b"\x04" + j({"token": "abcdefgh"}))
write("legacy_payload", "signal-winch", b"\x05" + j({"signalNumber": 28, "columns": 80, "rows": 24}))
write("legacy_payload", "log", b"\x06" + j({"source": "shim", "containerId": "c", "level": "warn", "msg": "x\nERROR forged"}))
write("legacy_payload", "vmio", b"\x07" + j({"io": {"URL": "unix:///run/cc-oci-runtime/proxy.sock", "tokens": ["a", "b"]}}))
write("legacy_payload", "error", b"\x08" + j({"msg": "bad"}))

# stream_frame: [chunk, stream...]
write("stream_frame", "stdin-and-control", b"\x04" + stream(0, b"input") + stream(5, j({"op": "resize", "rows": 24, "cols": 80})) + stream(0))
write("stream_frame", "output-exit", b"\x09" + stream(1, b"out") + stream(2, b"err") + stream(3, struct.pack(">i", 137)))
write("stream_frame", "detach", b"\x01" + stream(5, j({"op": "detach"})) + stream(5, j({"op": "detached"})))
write("stream_frame", "error", b"\x05" + stream(4, b"stream failed"))
write("stream_frame", "bad-channel", b"\x05" + stream(9))

# stream_control
for i, m in enumerate([{"op": "signal", "signal": 15}, {"op": "resize", "rows": 24, "cols": 80},
                       {"op": "detach"}, {"op": "close"}, {"op": "detached"}, {"op": "resize", "rows": 70000, "cols": 1}]):
    write("stream_control", f"msg-{i}", j(m))

# agent_classify: [flags (dialect, eof seen, on stdio), code, payload...]
write("agent_classify", "ack", b"\x00\x09{}")
write("agent_classify", "error", b"\x01\x0ano such process\x00")
write("agent_classify", "next", b"\x00\x0e\x00\x00\x02\x00")
write("agent_classify", "asyncevent-hyperstart", b"\x05\x17" + j({"container": "c", "process": "p1", "event": "finished", "status": 1}))
write("agent_classify", "asyncevent-cc-agent", b"\x04\x18" + j({"container": "c", "process": "p1", "event": "finished", "status": 1}))
write("agent_classify", "exit-status-cc-agent", b"\x06\x08\x03")
write("agent_classify", "stderr", b"\x01\x08stderr text")

# hvsock_reply: [read size, reply...]
write("hvsock_reply", "ok-with-data", b"\x03OK 1073741824\nDATA")
write("hvsock_reply", "bare-ok", b"\x40OK\n")
write("hvsock_reply", "refused", b"\x01ERR no listener\n")
write("hvsock_reply", "crlf", b"\x05OK 42\r\n")
write("hvsock_reply", "too-long", b"\x10" + b"O" * 70)

# jsonrpc_params: [method, request or params...]
REQS = [
    ("proxy.version", None),
    ("vm.register", {"id": "vm1", "control": "unix:///run/ctl.sock", "io": "vsock://3:1024", "console": "hvsock:///run/vm.sock:1025", "timeout_ms": 5000}),
    ("vm.attach", {"id": "vm1"}),
    ("vm.info", ["vm1"]),
    ("stream.allocate", {"vm": "vm1"}),
    ("agent.call", {"vm": "vm1", "command": "execcmd", "data": {"container": "c", "process": PROCESS}, "timeout_ms": 1000, "streams": 1}),
    ("stream.signal", {"token": "t", "signal": 9}),
    ("stream.resize", {"token": "t", "rows": 24, "cols": 80}),
    ("stream.close", {"token": "t"}),
    ("events.subscribe", {"vm": "vm1"}),
    ("tap.observe", {"vm": "vm1", "filter": ["process_exited"], "limit": 10}),
]
for i, (method, params) in enumerate(REQS):
    req = {"jsonrpc": "2.0", "id": i, "method": method}
    if params is not None:
        req["params"] = params
    write("jsonrpc_params", f"request-{method}", b"\x00" + j(req))
write("jsonrpc_params", "params-register", b"\x02" + j({"id": "vm1", "control": "tcp://127.0.0.1:1", "io": "tcp://127.0.0.1:2"}))
write("jsonrpc_params", "params-call", b"\x07" + j({"vm": "vm1", "command": "ping"}))
write("jsonrpc_params", "huge-id", b"\x00" + b'{"jsonrpc":"2.0","id":' + b"9" * 2000 + b',"method":"vm.list"}')
