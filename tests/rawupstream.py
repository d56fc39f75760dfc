"""A fake llama-server on a raw socket, for answers a real server never gives."""

import json
import socket
import struct
import threading
import time

from tests.servers import Listener

PAUSE = 0.2  # between the parts of an answer, so that each arrives on its own
SLOTS = 2


def response(status_line, headers=(), body=b""):
    """The bytes of an HTTP response, written exactly as given (no header added)."""
    head = b"".join(b"%s\r\n" % _bytes(line) for line in [status_line, *headers])
    return head + b"\r\n" + _bytes(body)


def chunked(*chunks, last=True):
    """A chunked body: each chunk with its size, and the final 0-chunk unless last=False."""
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), _bytes(c)) for c in chunks)
    return body + (b"0\r\n\r\n" if last else b"")


def event(value):
    """One server-sent event carrying value as JSON."""
    return b"data: %s\n\n" % json.dumps(value).encode()


def _bytes(text):
    return text if isinstance(text, bytes) else text.encode()


# The valid answers, by (method, path, whether the body asked for a stream): a JSON value
# (sent with its Content-Length) or a list of events (sent chunked, then [DONE]).
GOOD = {
    ("GET", "/props", False): {
        "total_slots": SLOTS,
        "model_path": "/models/raw.gguf",
        "build_info": "raw",
    },
    ("GET", "/slots", False): [
        {"id": i, "n_ctx": 4096, "id_task": -1, "is_processing": False} for i in range(SLOTS)
    ],
    ("GET", "/health", False): {"status": "ok"},
    ("GET", "/v1/models", False): {"object": "list", "data": [{"id": "raw", "object": "model"}]},
    ("POST", "/tokenize", False): {"tokens": [1, 2, 3]},
    ("POST", "/v1/chat/completions", False): {"choices": [{"message": {"content": "good"}}]},
    ("POST", "/v1/chat/completions", True): [{"choices": [{"delta": {"content": "good"}}]}],
    ("POST", "/completion", False): {"content": "good", "stop": True},
    ("POST", "/completion", True): [{"content": "good"}, {"content": "", "stop": True}],
}


def good_body(method, path, stream=False):
    """The body of the valid answer, as a client of bioproxy should get it."""
    value = GOOD[method, path, stream]
    if stream:
        return b"".join(map(event, value)) + b"data: [DONE]\n\n"
    return json.dumps(value).encode()


def good_answer(method, path, stream=False):
    if (method, path, stream) not in GOOD:
        body = b'{"error": {"code": 404, "message": "File Not Found"}}'
        return response("HTTP/1.1 404 Not Found", [f"Content-Length: {len(body)}"], body)
    body = good_body(method, path, stream)
    if stream:
        headers = ["Content-Type: text/event-stream", "Transfer-Encoding: chunked"]
        return response("HTTP/1.1 200 OK", headers, chunked(body))
    headers = ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return response("HTTP/1.1 200 OK", headers, body)


class RawUpstream(Listener):
    """A llama-server that answers each request with exactly the bytes a test set.

    - By default a request gets its valid answer from GOOD (bioproxy's own calls, GET
      /props, /slots and /health, see 2 idle slots), streamed when its JSON body says
      "stream"; other paths get a 404.
    - answer(data, path) answers every request for path (query left out) with data
      instead, until good(path). answer(data) without a path answers the first request
      of the next connection, whatever its path: it closes the connections open now, so
      that bioproxy's next request opens one (bioproxy's own calls may take it too).
    - data: bytes sent as they are, or a list of them sent PAUSE seconds apart.
    - then, once data is sent: "keep" the connection for the next request, "close" it
      (FIN), "reset" it (RST, PAUSE seconds later), or "stall" (hold it open, silent).
    - requests: (method, path) of every request read, in order.
    """

    def __init__(self):
        super().__init__()
        self.scripts = {}  # path -> (data, then)
        self.next_connection = None  # (data, then)
        self.requests = []
        self.listen()

    def answer(self, data, path=None, then="keep"):
        if path is not None:
            self.scripts[path] = (data, then)
            return
        self.next_connection = (data, then)
        self.close_open_connections()

    def good(self, path):
        self.scripts.pop(path, None)

    def accepted(self, sock):
        script, self.next_connection = self.next_connection, None
        threading.Thread(target=self._serve, args=(sock, script), daemon=True).start()

    def _serve(self, sock, script):
        reader = sock.makefile("rb")
        try:
            self._answer(sock, reader, script)
        except OSError:
            pass
        finally:
            # The file from makefile() keeps the socket open until it is closed too.
            reader.close()
            sock.close()

    def _answer(self, sock, reader, script):
        while request := _read_request(reader):
            method, path, stream = request
            self.requests.append((method, path))
            scripted = script or self.scripts.get(path)
            data, then = scripted or (good_answer(method, path, stream), "keep")
            script = None
            for i, part in enumerate(data if isinstance(data, list) else [data]):
                if i:
                    time.sleep(PAUSE)
                sock.sendall(part)
            if then == "reset":
                # Data the peer has not read yet may be dropped at an RST: let it read.
                time.sleep(PAUSE)
                # A zero linger time turns the close into an RST.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            while then == "stall" and not self.closed:
                time.sleep(0.05)
            if then != "keep":
                return


def _read_request(reader):
    """(method, path without query, whether the body asks for a stream), None at the end."""
    line = reader.readline()
    if not line.strip():
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    length = 0
    while (header := reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = reader.read(length)
    try:
        stream = json.loads(body).get("stream") is True
    except (ValueError, AttributeError):
        stream = False
    return method, target.split("?")[0], stream
