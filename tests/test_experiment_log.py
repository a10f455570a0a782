"""[logging] backend = "tensorboard" | "wandb": the trackers hold the JSONL log's scalars at its
steps, read back record by record: TensorBoard's event files (TFRecord framing, Event protos) and
W&B's offline run file (LevelDB log framing, W&B's own Record protos, as `wandb sync` reads it)."""

import json
import struct

import pytest

from crosscoder.trainer import train

from .conftest import small_run_config


def read_scalars(directory) -> dict[str, dict[int, float]]:
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    for path in files:
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at: at + 8])
            record = data[at + 12: at + 12 + length]  # after the length and its CRC
            at += 12 + length + 4  # and the record's CRC
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def assert_logged_rows_held(run, tracked: dict[str, dict[int, float]]) -> None:
    """Every train_log.jsonl row's scalars are in ``tracked`` (tag → step → value) at its step."""
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [4, 8, 12]
    for row in log:
        step = row["step"]
        for term, value in row["loss"].items():
            assert tracked[f"loss/{term}"][step] == pytest.approx(value, rel=1e-6)
        for source, value in row["fve"].items():
            assert tracked[f"fve/{source}"][step] == pytest.approx(value, rel=1e-6, abs=1e-7)
        for key in ("l0", "dead_fraction", "lr", "grad_norm"):
            assert tracked[key][step] == pytest.approx(row[key], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("backend", ["tensorboard", "none"])
def test_tensorboard_event_files_hold_the_logged_scalars(small_shards, tmp_path, backend):
    cfg = small_run_config(steps=12, log_every=4, checkpoint_every=0)
    cfg.logging.backend = backend
    train(cfg, tmp_path / "run", data=small_shards, progress=False)
    if backend == "none":
        assert not (tmp_path / "run" / "tensorboard").exists()
        return
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert_logged_rows_held(tmp_path / "run", scalars)
    assert sorted(scalars["tokens_per_s"]) == [8, 12] and all(v > 0 for v in scalars["tokens_per_s"].values())


def read_wandb_history(run_file) -> dict[str, dict[int, float]]:
    """History rows of a ``run-<id>.wandb`` file: a 7-byte W&B header, then LevelDB log records in
    32 KiB blocks (4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    block, at, pending, records = 32768, 7, b"", []
    while at + 7 <= len(data):
        if block - at % block < 7:  # a block's tail too short for a header is padding
            at += block - at % block
            continue
        length, kind = struct.unpack("<HB", data[at + 4: at + 7])
        if kind == 0 and length == 0:
            break
        pending += data[at + 7: at + 7 + length]
        at += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    out: dict[str, dict[int, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    out.setdefault(key, {})[step] = json.loads(item.value_json)
    return out


def test_wandb_offline_run_holds_the_logged_scalars_and_resumes_the_same_run(small_shards, tmp_path):
    from crosscoder.experiment_log import wandb_run_id

    cfg = small_run_config(steps=12, log_every=4, checkpoint_every=4)
    cfg.logging.backend, cfg.logging.wandb_mode, cfg.logging.project = "wandb", "offline", "crosscoder-test"
    run = tmp_path / "run"
    train(cfg, run, data=small_shards, progress=False, stop_after=8)
    train(cfg, run, data=small_shards, progress=False)  # resumes: the same W&B run id
    runs = sorted((run / "wandb").glob("offline-run-*"))
    # each call's directory holds the one run's file (two calls in one second: W&B adds "-1" to the second's name)
    assert len(runs) == 2 and all((r / f"run-{wandb_run_id(run)}.wandb").is_file() for r in runs), runs
    history: dict[str, dict[int, float]] = {}
    for r in runs:
        for key, values in read_wandb_history(r / f"run-{wandb_run_id(run)}.wandb").items():
            history.setdefault(key, {}).update(values)
    assert_logged_rows_held(run, history)
    assert wandb_run_id(run) != wandb_run_id(tmp_path / "other")
