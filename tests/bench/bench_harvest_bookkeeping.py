"""Harvest bookkeeping at real dataset sizes: the driver's cost per shard for 1k and 10k planned shards.

    python tests/bench/bench_harvest_bookkeeping.py [--shards 1000,10000] [--out bench-results/bookkeeping.json]

On a moto S3 server on 127.0.0.1, N tiny shards are committed (the bytes do not matter here; the
count does), then the driver-side work of a harvest is timed per shard:

- ``manifest``: rebuilding and uploading ``manifest.json`` for N shards, once (what a harvest does
  now: at most every 60 s and at the end), and what writing it after every shard cost (N rewrites
  of a growing manifest: quadratic), extrapolated from the same per-write time;
- ``resume``: ``committed_shards`` on a re-run: one listing and a tag comparison per shard, no shard
  downloaded (the requests are counted by a proxy);
- ``plan``: the token ids the driver holds, bytes per token (int32 arrays).

Flat per-shard figures from 1k to 10k shards are the goal. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import numpy as np  # noqa: E402

from crosscoder.config import RunConfig  # noqa: E402
from crosscoder.harvest import build_manifest, committed_shards, harvest_settings  # noqa: E402
from crosscoder.language_models import ModelSpec  # noqa: E402
from crosscoder.shards import ShardWriter, shard_name, write_manifest  # noqa: E402
from crosscoder.storage import Root  # noqa: E402
from tests.conftest import free_port, wait_for_port  # noqa: E402
from tests.test_harvest import start_flaky_proxy  # noqa: E402


def measure(endpoint: str, n: int) -> dict:
    import s3fs

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir(bucket)
    root = Root(f"s3://{bucket}/acts", endpoint_url=endpoint)
    cfg = RunConfig()
    cfg.harvest.models = [{"name": "base", "path": "base"}]
    settings = harvest_settings(cfg, n)
    infos = []
    started = time.perf_counter()
    for i in range(n):
        writer = ShardWriter(root, shard_name(i), width=4, dtype="float16")
        writer.add("00000000-0000", np.arange(2, dtype=np.int32), np.zeros((2, 4), np.float16), {})
        info = writer.commit()
        info.stats, info.etag = {"norm_sum": [1.0]}, root.version_tag(info.name)
        infos.append(info)
    commit_s = time.perf_counter() - started
    sources = [("base", ModelSpec("base", "base"), "model.layers.0")]
    started = time.perf_counter()
    manifest = build_manifest(cfg, sources, [4], infos, "tok", settings, n, "plan")
    write_manifest(root, manifest)
    write_s = time.perf_counter() - started
    server, state = start_flaky_proxy(endpoint, failures=0)
    try:
        proxied = Root(f"s3://{bucket}/acts", endpoint_url=f"http://127.0.0.1:{server.server_address[1]}")
        started = time.perf_counter()
        ok = committed_shards(proxied, settings, "plan")
        resume_s = time.perf_counter() - started
    finally:
        server.shutdown()
    assert len(ok) == n
    shard_gets = sum(1 for method, path in state["log"] if method == "GET" and ".tar" in path)
    return {"shards": n, "commit_ms_per_shard": 1000 * commit_s / n, "manifest_bytes": len(manifest.to_json()),
            "manifest_write_ms": 1000 * write_s, "manifest_ms_per_shard_once": 1000 * write_s / n,
            "manifest_ms_per_shard_if_every_shard": 1000 * write_s * (n + 1) / 2 / n,
            "resume_ms_per_shard": 1000 * resume_s / n, "resume_requests": len(state["log"]),
            "resume_shard_downloads": shard_gets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="1000,10000")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "bookkeeping.json"))
    args = parser.parse_args()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        rows = [measure(f"http://127.0.0.1:{port}", int(n)) for n in args.shards.split(",")]
    finally:
        proc.terminate()
    print("| planned shards | commit ms/shard | manifest write (once) | ms/shard, written once | ms/shard, "
          "written every shard | resume ms/shard | resume requests | shards downloaded |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shards']:,} | {r['commit_ms_per_shard']:.1f} | {r['manifest_write_ms']:.0f} ms "
              f"({r['manifest_bytes'] / 1e6:.1f} MB) | {r['manifest_ms_per_shard_once']:.3f} | "
              f"{r['manifest_ms_per_shard_if_every_shard']:.1f} | {r['resume_ms_per_shard']:.3f} | "
              f"{r['resume_requests']} | {r['resume_shard_downloads']} |")
    print("token ids in the driver's plan: 4 bytes a token (int32 arrays; Python lists of ints took ~36)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
