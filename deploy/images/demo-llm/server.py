"""horde/demo-llm: a small deterministic text "model" served over HTTP (python stdlib only).

It needs no weights: each word is drawn from a fixed vocabulary by a sha256 chain seeded with the
prompt, so the same request always gets the same answer, byte for byte, on any machine (what the
validator's replay checks rely on).

    POST /            body: the prompt as plain text, or a JSON object
                      {"prompt": "...", "max_tokens": 32, "stream": false, "token_delay_ms": 0}
                      -> text/plain; with "stream": true the words come as HTTP chunks, one
                      chunk per word (token_delay_ms apart, to look like a model thinking),
                      and their concatenation equals the non-streamed answer
    GET  /health      -> 200 "ok"
    POST /extra-data  {"file": NAME, ...}: the executor placed /volume/extra/NAME (read-only);
                      the model folds nothing in, it only lists what arrived
    GET  /extra-data  -> JSON list of the files announced, with their sizes as seen here

Environment: HORDE_PORT (or PORT, default 8000), DISHONEST_RATE (share of prompts answered
wrongly, default 0; horde/demo-llm-dishonest sets 0.1). Which prompts get a wrong answer is
itself a function of the prompt, so a dishonest answer is reproducible too.

horde/demo-llm-dishonest is built FROM this image (deploy/images/demo-llm-dishonest/Dockerfile)
and only sets DISHONEST_RATE: one server, one model.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VOCAB = (
    "the a of and to in is that it was for on are as with his they at be this from have or by "
    "one had not but what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her two like "
    "him see time could no make than first been its who now people my made over did down only "
    "way find use may water long little very after words called just where most know get "
    "through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place "
    "well such here take why things help put years different away again off went old number "
    "great tell men say small every found still between name should home big give air line "
    "set own under read last never us left end along while might next sound below saw "
    "something thought both few those always looked show large often together asked house "
    "world going want school important until form food keep children feet land side without "
    "boy once animals life enough took sometimes four head above kind began almost live page "
    "got earth need far hand high year mother light parts country father let night following "
    "picture being study second eyes soon times story boys since white days ever paper hard "
    "near sentence better best across during today others however sure means knew its try "
    "told young miles sun ways thing whole hear example heard several change answer room sea "
    "against top turned learn point city play toward five using himself usually"
).split()
DEFAULT_TOKENS = 32
MAX_TOKENS = 4096
MAX_DELAY_MS = 1000
MAX_BODY = 16 * 1024 * 1024
EXTRA_DIR = os.environ.get("HORDE_EXTRA_DIR", "/volume/extra")


def _rate() -> float:
    try:
        return min(max(float(os.environ.get("DISHONEST_RATE", "0") or 0), 0.0), 1.0)
    except ValueError:
        return 0.0


DISHONEST_RATE = _rate()


def answers_wrongly(prompt: bytes, rate: float = DISHONEST_RATE) -> bool:
    draw = int.from_bytes(hashlib.sha256(b"demo-llm.dishonest\x00" + prompt).digest()[:8], "big")
    return draw < rate * 2**64


def generate(prompt: bytes, max_tokens: int, rate: float = DISHONEST_RATE) -> Iterator[str]:
    """The answer's pieces: the first word, then " word" for each next one."""
    salt = b"wrong\x00" if answers_wrongly(prompt, rate) else b""
    state = hashlib.sha256(b"demo-llm.v1\x00" + salt + prompt).digest()
    for i in range(max_tokens):
        state = hashlib.sha256(state).digest()
        word = VOCAB[int.from_bytes(state[:4], "big") % len(VOCAB)]
        yield word if i == 0 else " " + word


def _int(value: object, default: int, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        return default
    return min(max(value, lo), hi)


def parse(body: bytes) -> tuple[bytes, int, bool, float]:
    """(prompt, max_tokens, stream, token delay in s) from a plain-text or JSON body."""
    if body[:1] == b"{":
        try:
            req = json.loads(body)
        except ValueError:
            req = None
        if isinstance(req, dict) and isinstance(req.get("prompt"), str):
            return (
                req["prompt"].encode(),
                _int(req.get("max_tokens"), DEFAULT_TOKENS, 1, MAX_TOKENS),
                bool(req.get("stream", False)),
                _int(req.get("token_delay_ms"), 0, 0, MAX_DELAY_MS) / 1000,
            )
    return body, DEFAULT_TOKENS, False, 0.0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the job proxy reuses its connection
    # Buffered: a response's head and body leave in one write (flushed once the handler returns;
    # streamed chunks are flushed one by one), not as two segments the peer must wake up for.
    wbufsize = 64 * 1024
    server_version = "demo-llm/1"
    announced: list[dict[str, object]] = []
    lock = threading.Lock()

    def setup(self) -> None:
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would only fill the executor's capped log buffer

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(413, b"request too large\n")
            return None
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, b"ok\n")
        elif self.path == "/extra-data":
            with self.lock:
                files = list(self.announced)
            self._reply(200, json.dumps(files).encode(), "application/json")
        else:
            self._reply(404, b"not found\n")

    def do_POST(self) -> None:
        body = self._body()
        if body is None:
            return
        if self.path == "/extra-data":
            self._extra(body)
            return
        if self.path != "/":
            self._reply(404, b"not found\n")
            return
        prompt, tokens, stream, delay = parse(body)
        if not stream:
            text = "".join(generate(prompt, tokens)).encode()
            self._reply(200, text, "text/plain; charset=utf-8")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index, piece in enumerate(generate(prompt, tokens)):
            if delay and index:
                time.sleep(delay)
            data = piece.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _extra(self, body: bytes) -> None:
        try:
            note = json.loads(body)
            name = str(note["file"])
        except (ValueError, KeyError, TypeError):
            self._reply(400, b'expected {"file": NAME}\n')
            return
        path = os.path.join(EXTRA_DIR, os.path.basename(name))
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        with self.lock:
            self.announced.append({"file": name, "size": size})
        self._reply(200, b'{"ok": true}', "application/json")


def main() -> None:
    port = int(os.environ.get("HORDE_PORT") or os.environ.get("PORT") or 8000)
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    print(f"demo-llm listening on :{port} (dishonest rate {DISHONEST_RATE})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
