# The meshed "guest" service of tests/it/mesh_data.rs: a real HTTP/1.1 server (Python's http.server) with
# keep-alive, run by the test on a loopback port given as argv[1]; prints "listening" once bound.
#
#   GET  /headers  -> JSON: the request's version, l5d-client-id values, the client's port (keep-alive reuse)
#   GET  /big      -> 10 MiB of a known pattern
#   POST /sum      -> "<sha256 hex> <length>" of the request body
#   GET  /slow     -> waits 1.5 s, then "slow done" (drain tests); with ?mark=PATH it first creates the file
#                     PATH, so a test knows the request has arrived
#   GET  /ws       -> WebSocket (RFC 6455): echoes every text/binary message, answers a close with a close
import base64
import hashlib
import json
import struct
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BIG = bytes(i % 251 for i in range(10 * 1024 * 1024))
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/headers":
            body = json.dumps({
                "version": self.request_version,
                "client_id": self.headers.get_all("l5d-client-id") or [],
                "peer_port": self.client_address[1],
            }).encode()
            self.reply(200, body, "application/json")
        elif path == "/big":
            self.reply(200, BIG, "application/octet-stream")
        elif path == "/slow":
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            for mark in query.get("mark", []):
                open(mark, "w").close()
            time.sleep(1.5)
            self.reply(200, b"slow done")
        elif path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self.websocket()
        else:
            self.reply(404, b"no such path")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        left = n
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        self.reply(200, f"{h.hexdigest()} {n - left}".encode())

    def read_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.rfile.read(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        try:
            while True:
                b0, b1 = self.read_exact(2)
                opcode, masked, n = b0 & 0x0F, b1 & 0x80, b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self.read_exact(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self.read_exact(8))[0]
                mask = self.read_exact(4) if masked else b"\0\0\0\0"
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(self.read_exact(n)))
                if n < 126:
                    head = bytes([0x80 | opcode, n])
                else:
                    head = bytes([0x80 | opcode, 126]) + struct.pack(">H", n)
                self.wfile.write(head + payload)
                self.wfile.flush()
                if opcode == 8:
                    break
        except EOFError:
            pass
        self.close_connection = True


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
print("listening", flush=True)
server.serve_forever()
