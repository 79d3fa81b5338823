"""A consumer in its own process, for the multi-process tests.

``python -m tests.mq.consumer_proc URL ack --idle-s 1.5`` reserves and acks until
nothing came for ``idle-s``; ``... URL hold --count 10`` reserves ``count`` messages,
prints HELD and sleeps (to be killed). Each delivery prints ``GOT <id> <deliveries>``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from config.settings import load_settings
from mq.base import open_queue


async def main(args: argparse.Namespace) -> None:
    settings = load_settings(mq_reservation_msecs=args.reservation_ms)
    queue = open_queue(args.url, settings)
    try:
        await queue.stats()  # connected and the schema exists
        print("READY", flush=True)
        if args.mode == "hold":
            held = 0
            while held < args.count:
                batch = await queue.reserve_many(args.count - held, 10.0)
                for msg in batch:
                    print(f"GOT {msg.call.id} {msg.deliveries}")
                held += len(batch)
            print("HELD", flush=True)
            await asyncio.sleep(3600)
        while batch := await queue.reserve_many(args.batch, args.idle_s):
            print("\n".join(f"GOT {m.call.id} {m.deliveries}" for m in batch), flush=True)
            await queue.ack_many(batch)
    finally:
        await queue.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("mode", choices=["ack", "hold"])
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--idle-s", type=float, default=1.5)
    parser.add_argument("--reservation-ms", type=int, default=60_000)
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)
