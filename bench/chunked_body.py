"""What reading a chunked request body costs the server per chunk: one POST whose
body is ``--chunks`` chunks of ``--size`` bytes, read by :class:`HttpServer` over a
memory stream (no sockets, no handler work), and the same bytes of body sent with a
``content-length``, for the per-chunk difference. Run under callgrind for counts that
repeat (``valgrind --tool=callgrind python bench/chunked_body.py --only chunked``),
or plain for CPU seconds. The ``[server] max_body_chunks`` bound is lifted here."""

from __future__ import annotations

import argparse
import time

import attrs
import trio
import trio.testing

from ostiary.protocol.admission import Admission
from ostiary.runtime.http import HttpRequest, HttpServer, HttpSettings, Responder

Header = tuple[bytes, bytes]


class _Handler:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def admits(
        self, method: str, target: str, headers: tuple[Header, ...], peer: str
    ) -> Admission:
        return Admission(None, 1 << 30, peer)

    async def handle(self, request: HttpRequest, responder: Responder) -> None:
        self.sizes.append(len(request.body))
        await responder.respond(204, (), b"")

    async def refuse(self, *args: object) -> None:
        raise AssertionError(args)


def _settings() -> HttpSettings:
    # Spelled so that the bench also runs on a tree from before the bound existed.
    fields = {f.name for f in attrs.fields(HttpSettings)}
    lifted = {"max_body_chunks": 1 << 30}
    return HttpSettings(**{k: v for k, v in lifted.items() if k in fields})


async def _serve(request: bytes) -> None:
    handler = _Handler()
    server = HttpServer(handler, _settings())
    client, srv = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_connection, srv)
        for start in range(0, len(request), 65536):
            await client.send_all(request[start : start + 65536])
        received = b""
        while b"\r\n\r\n" not in received:
            received += await client.receive_some(65536)
        nursery.cancel_scope.cancel()
    assert received.startswith(b"HTTP/1.1 204"), received[:100]


def _requests(chunks: int, size: int) -> dict[str, bytes]:
    piece = b"x" * size
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\n"
    chunked = b"%x\r\n%s\r\n" % (size, piece)
    return {
        "chunked": head + b"transfer-encoding: chunked\r\n\r\n" + chunked * chunks + b"0\r\n\r\n",
        "length": head + b"content-length: %d\r\n\r\n" % (chunks * size) + piece * chunks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1)
    parser.add_argument("--only", choices=("chunked", "length"), default=None)
    args = parser.parse_args()
    requests = _requests(args.chunks, args.size)
    spent = {}
    for name, request in requests.items():
        if args.only not in (None, name):
            continue
        start = time.process_time()
        trio.run(_serve, request)
        spent[name] = time.process_time() - start
        print(f"{name}: {spent[name]:.3f} s CPU")
    if len(spent) == 2:
        per_chunk = (spent["chunked"] - spent["length"]) / args.chunks * 1e6
        print(f"chunked costs {per_chunk:.2f} us of CPU more per chunk")


if __name__ == "__main__":
    main()
