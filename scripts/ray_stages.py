"""Run dualign's data-parallel stages on a Ray cluster: Ray places the processes, torch.distributed
connects them, exactly as torchrun would.

    pip install 'ray[default]'
    python scripts/ray_stages.py --workers 2 -- sample --model M --prompts P.jsonl --run-dir runs/a --num-samples 8
    python scripts/ray_stages.py --workers 2 -- score --run-dir runs/a --scorer reward=hf:R --scorer cost=hf:C,lower_is_better
    python scripts/ray_stages.py --workers 2 -- evaluate --run-dir runs/a --shard-size 16 ...

Each of ``--workers`` Ray tasks (one per GPU with ``--gpus-per-worker 1``) runs ``python -m dualign
<args>`` with the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):
worker 0 picks its node's address and a free port, the others connect to it. ``dualign`` cannot tell
Ray from torchrun, so the stages' guarantees hold (any number of processes writes the same table;
only the main process writes records and markers). The run directory must be on a filesystem every
node sees. Without ``--address`` it starts a local Ray (``ray.init()``), as the example in docs/guides/at-scale.md
ran; with ``--address auto`` it joins the running cluster.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import ray


def _address_and_port() -> tuple[str, int]:
    """This node's IP and a port free on it (worker 0's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """``python -m dualign ARGS`` with the launcher's environment; (exit code, last lines of output)."""
    res = subprocess.run([sys.executable, "-m", "dualign", *args], capture_output=True, text=True,
                         env={**os.environ, **env})
    return res.returncode, (res.stdout + res.stderr)[-2000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="processes (one per GPU on a GPU cluster)")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs Ray reserves for each process")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs Ray reserves for each process")
    parser.add_argument("--address", default=None, help="Ray cluster address ('auto': the running one); "
                                                        "default: start Ray locally")
    parser.add_argument("dualign_args", nargs=argparse.REMAINDER, help="-- then a dualign command and its flags")
    args = parser.parse_args()
    command = [a for a in args.dualign_args if a != "--"]
    if not command:
        parser.error("give the dualign command after --, e.g. -- sample --model M ...")
    ray.init(address=args.address, num_cpus=None if args.address else args.workers * args.cpus_per_worker,
             include_dashboard=False)
    resources = {"num_cpus": args.cpus_per_worker, "num_gpus": args.gpus_per_worker}
    master, port = ray.get(ray.remote(**resources)(_address_and_port).remote())
    env = [{"RANK": str(r), "WORLD_SIZE": str(args.workers), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": master, "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(int(args.cpus_per_worker))}
           for r in range(args.workers)]
    runs = [ray.remote(**resources)(_run).remote(command, e) for e in env]
    results = ray.get(runs)
    for rank, (code, tail) in enumerate(results):
        if code != 0:
            print(f"worker {rank} failed (exit {code}):\n{tail}", file=sys.stderr)
    if all(code == 0 for code, _ in results):
        print(results[0][1].strip())
    ray.shutdown()
    return max(code for code, _ in results)


if __name__ == "__main__":
    sys.exit(main())
