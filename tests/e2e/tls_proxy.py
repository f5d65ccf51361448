"""A TLS-terminating TCP proxy for the Kafka-over-TLS test: accepts TLS on
127.0.0.1:LISTEN with CERT/KEY and forwards the plaintext to 127.0.0.1:UPSTREAM.

    python tls_proxy.py LISTEN UPSTREAM CERT KEY

Prints `listening PORT` once it accepts, and on every closed connection
`closed TLS_BYTES_IN TLS_BYTES_OUT`, so the test can see the traffic went through it.
"""

from __future__ import annotations

import asyncio
import ssl
import sys


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: list[int], i: int) -> None:
    try:
        while data := await reader.read(65536):
            count[i] += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - the other side is already gone
            pass


async def main() -> None:
    listen, upstream, cert, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_w.close()
            return
        count = [0, 0]
        # When either side is done, so is the connection (tansu keeps a half-closed
        # socket open), and the counts are reported.
        tasks = [
            asyncio.ensure_future(pump(client_r, broker_w, count, 0)),
            asyncio.ensure_future(pump(broker_r, client_w, count, 1)),
        ]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for writer in (client_w, broker_w):
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already gone
                pass
        print(f"closed {count[0]} {count[1]}", flush=True)

    server = await asyncio.start_server(handle, "127.0.0.1", listen, ssl=context)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
