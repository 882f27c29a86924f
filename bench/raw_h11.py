"""The ceiling: the least an h11-on-trio server can do per request (parse it, answer
a fixed JSON body). Ostiary's own numbers are read against this one, measured in the
same run on the same machine. ``python bench/raw_h11.py [--port P]`` (it prints
``listening on <url>`` first)."""

from __future__ import annotations

import argparse

import h11
import trio
from serving import announce

BODY = b'{"ok":true}'


async def handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return
            conn.receive_data(data)
        elif isinstance(event, h11.EndOfMessage):
            headers = [("content-type", "application/json"), ("content-length", str(len(BODY)))]
            out = conn.send(h11.Response(status_code=200, headers=headers)) or b""
            out += conn.send(h11.Data(data=BODY)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(out)
            conn.start_next_cycle()
        elif not isinstance(event, h11.Request | h11.Data):
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0: the kernel picks (printed)")
    args = parser.parse_args()
    trio.run(serve, args.port)


async def serve(port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    announce("127.0.0.1", listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


if __name__ == "__main__":
    main()
