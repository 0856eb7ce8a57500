"""The e2e scenario's modelfleet side, for a profiler: a controller and 2 echo workers (CLI
subprocesses) and a Client closed loop in this process.

    pip install py-spy
    py-spy record -r 100 -f raw -o client.raw -- python -m bench.profile_e2e --seconds 15
    # meanwhile, once it prints "measuring": py-spy record --pid <a worker pid it printed> ...

Prints the workers' PIDs, "measuring", then jobs/s (or p50 with ``--in-flight 1``). Every process
it starts is stopped, and its namespace deleted, when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from bench.run import PAYLOAD, Context, Plan, Processes, closed_loop, scenario, sequential
from modelfleet import Client

DEFAULT_URL = os.environ.get("MODELFLEET_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def main(url: str, in_flight: int, seconds: float, concurrency: int) -> None:
    procs = Processes(Path(tempfile.mkdtemp(prefix="modelfleet-profile-")))
    ctx = Context(url=url, plan=Plan.build(True, 1, concurrency), procs=procs)
    try:
        async with scenario(ctx, "e2e") as sc:
            status, env = await sc.controller()
            model = sc.ns.model("echo")
            workers = [
                sc.worker(env, model, "modelfleet.handlers:echo", concurrency) for _ in range(2)
            ]
            status.watch += workers
            await status.wait_routable(model, 2)
            print("workers:", " ".join(str(w.pid) for w in workers), flush=True)
            async with Client(sc.ns.settings(), timeout=60) as client:

                async def call() -> object:
                    return await client.submit(model, PAYLOAD)

                await closed_loop(call, 64, 1.0)  # warm-up
                print("measuring", flush=True)
                if in_flight == 1:
                    latencies = sorted(await sequential(call, int(seconds * 500)))
                    print(f"p50 {latencies[len(latencies) // 2] * 1000:.3f} ms", flush=True)
                else:
                    rate = await closed_loop(call, in_flight, seconds)
                    print(f"{rate:,.0f} jobs/s", flush=True)
    finally:
        procs.stop_all()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.in_flight, args.seconds, args.concurrency))
