"""One crosscoder process per run directory (run_lock.py): a second is refused by name, and a holder
that dies, however it dies, leaves no stale lock. An output runs share (a shard root, the organism)
is waited for instead."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from crosscoder.run_lock import LOCK_FILE, OUTPUT_LOCK_FILE, RunDirBusy, hold, shared_output

from .conftest import said

HOLDER = """
import sys, time
from pathlib import Path
from crosscoder.run_lock import hold
with hold(Path(sys.argv[1]), "crosscoder train --run elsewhere"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_holder_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"{run} is in use by another crosscoder process \(pid {proc.pid} on "
                                             r".*`crosscoder train --run elsewhere`, since .*use another --run"):
            with hold(run, "crosscoder run"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with hold(run, "crosscoder run"):  # the kernel released the dead holder's lock
        assert '"command": "crosscoder run"' in (run / LOCK_FILE).read_text()
    with hold(run, "crosscoder analyze"):  # and the block's end released ours
        pass
    with pytest.raises(ValueError, match="inside"), hold(run, "crosscoder train"):
        raise ValueError("inside")  # an error in the block is the block's, and releases the lock too
    with hold(run, "crosscoder train"):
        pass


SHARER = """
import sys
from pathlib import Path
from crosscoder.run_lock import shared_output
with shared_output(Path(sys.argv[1]), "harvest"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def in_a_thread(work) -> threading.Event:
    """Run ``work`` in a thread; the event is set when it returns."""
    done = threading.Event()
    threading.Thread(target=lambda: (work(), done.set()), daemon=True).start()
    return done


def test_a_shared_output_is_waited_for_naming_the_holder_then_taken(tmp_path, capsys, monkeypatch):
    import crosscoder.run_lock as run_lock

    monkeypatch.setattr(run_lock, "REMIND_EVERY_S", 0.6)
    out = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "-c", SHARER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        entered, leave = threading.Event(), threading.Event()

        def second():
            with shared_output(out, "harvest"):
                entered.set()
                leave.wait(30)

        second_done = in_a_thread(second)
        err = said(capsys, "still waiting")  # ~1 s in
        assert not entered.is_set()  # waiting, not refused
        assert f"harvest: waiting for another crosscoder process writing {out} (pid {proc.pid} on " in err, err
        assert "its work will be kept" in err and f"harvest: still waiting for {out} (0 min)" in err  # said again
        assert proc.stdin is not None
        proc.stdin.write("release\n")
        proc.stdin.flush()
        assert entered.wait(30)  # the holder's end lets the waiter in
        assert f'"pid": {os.getpid()}' in (out / OUTPUT_LOCK_FILE).read_text()  # and it says so in the lock file
        leave.set()
        assert second_done.wait(30)  # released: the check below takes it afresh
        capsys.readouterr()  # reminders said between the read above and the entry (a slow machine) are not the next check's
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with shared_output(out, "harvest"):  # free at once: nothing said
        with hold(out, "crosscoder harvest --run out"):  # a shard root that is the run directory itself
            pass
    assert "waiting" not in capsys.readouterr().err


def test_two_runs_on_one_organism_make_it_once(tmp_path, capsys):
    """The BatchTopK and L1 organism configs share organism.directory: the second run started at
    once waits for the first (instead of making the same models in the same folder at the same time)
    and keeps what it made."""
    from crosscoder import organism

    made = tmp_path / "organism"
    with shared_output(made, "organism"):  # the first run, making it
        got: list = []
        done = in_a_thread(lambda: got.append(organism.make_organism(made, steps=3, lr=1e-3, batch=2)))
        assert "organism: waiting for another crosscoder process" in said(capsys, "waiting")
        assert not done.is_set()
        record = {"settings": organism.settings(3, 1e-3, 2), "behaviour": {"refused": 7}}
        (made / "organism.json").write_text(json.dumps(record))  # what the first run leaves
    assert done.wait(30) and got == [record]  # kept, not made again (that would take minutes and a GGUF)


def test_two_runs_on_one_synthetic_root_write_it_once(tmp_path, capsys):
    """A sweep over planted synthetic data started at once: the second waits for the first's shards
    and keeps them."""
    from crosscoder.config import RunConfig
    from crosscoder.pipeline import plan, synthetic
    from crosscoder.synthetic import write_synthetic

    cfg = RunConfig()
    cfg.synthetic.tokens, cfg.synthetic.seq_len, cfg.synthetic.samples_per_shard = 2048, 64, 8
    cfg.synthetic.output = str(tmp_path / "shards")
    p = plan(cfg, tmp_path / "run")
    with shared_output(tmp_path / "shards", "shards"):  # the first run, writing
        got: list = []
        done = in_a_thread(lambda: got.append(synthetic(p, progress=False)))
        assert "shards: waiting for another crosscoder process" in said(capsys, "waiting")
        assert not done.is_set()
        first = write_synthetic(cfg.synthetic, str(tmp_path / "shards"), progress=False)
        stamps = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "shards").glob("shard-*.tar")}
    assert done.wait(30) and got[0].to_json() == first.to_json()
    assert "already complete" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "shards").glob("shard-*.tar")} == stamps


LEASER = """
import socket, sys
from crosscoder import run_lock
from crosscoder.storage import Root
run_lock.LEASE_RENEW_S, run_lock.LEASE_STALE_S = 0.3, 2.0
if sys.argv[3] == "elsewhere":
    socket.gethostname = lambda: "another-node"
with run_lock.shared_root(Root(sys.argv[1], endpoint_url=sys.argv[2]), "harvest"):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("holder_ends", ["releases", "is killed here", "is killed elsewhere"])
def test_an_object_store_root_is_leased_renewed_while_held_and_taken_when_its_holder_is_gone(
        s3_bucket, tmp_path, capsys, monkeypatch, holder_ends):
    """S3 has no flock: a lock object written only if absent, rewritten every LEASE_RENEW_S while
    held. A live holder's lease is waited for past LEASE_STALE_S (the rewrites keep it fresh); a
    released one is taken at once; a killed holder's is taken once stale (on another node) or at
    once (on this host, where its pid is seen gone), saying so."""
    import crosscoder.run_lock as run_lock
    from crosscoder.storage import Root

    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/acts"
    monkeypatch.setattr(run_lock, "LEASE_RENEW_S", 0.3)
    monkeypatch.setattr(run_lock, "LEASE_STALE_S", 2.0)
    monkeypatch.setattr(run_lock, "LEASE_POLL_S", 0.2)
    proc = subprocess.Popen([sys.executable, "-c", LEASER, url, endpoint, holder_ends.rsplit(" ", 1)[-1]],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    root = Root(url, endpoint_url=endpoint)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        entered, leave = threading.Event(), threading.Event()

        def second():
            with run_lock.shared_root(root, "harvest"):
                entered.set()
                leave.wait(30)

        in_a_thread(second)
        assert not entered.wait(4.0)  # twice LEASE_STALE_S: the holder's rewrites keep its lease fresh
        err = said(capsys, "waiting for another")
        assert f"harvest: waiting for another crosscoder process writing {url} (pid {proc.pid} on " in err, err
        assert proc.stdin is not None
        if holder_ends == "releases":
            proc.stdin.write("release\n")
            proc.stdin.flush()
            assert entered.wait(10)
            assert "not renewed" not in capsys.readouterr().err
        else:
            proc.kill()
            proc.wait(timeout=30)
            assert entered.wait(15)
            why = r"its process is not running" if holder_ends == "is killed here" else r"not renewed for \d+ min"
            assert re.search(rf"harvest: removing {url}/.output.lock \({why}\): its holder \(pid {proc.pid} on .*\) "
                             r"is gone", capsys.readouterr().err)
        assert f'"pid": {os.getpid()}' in root.read_bytes(".output.lock").decode()  # the second holds it now
        leave.set()
        deadline = time.time() + 10
        while root.exists(".output.lock") and time.time() < deadline:
            time.sleep(0.1)
        assert not root.exists(".output.lock")  # released at the block's end
    finally:
        proc.kill()
        proc.wait(timeout=30)
