"""[logging] backend = "tensorboard": the event files hold the JSONL log's scalars at its steps,
read back record by record (TFRecord framing, tensorboard's Event protos)."""

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


@pytest.mark.parametrize("backend", ["tensorboard", "none"])
def test_tensorboard_event_files_hold_the_logged_scalars(small_shards, tmp_path, backend):
    cfg = small_run_config(steps=12, log_every=4, checkpoint_every=0)
    cfg.logging.backend = backend
    train(cfg, tmp_path / "run", data=small_shards, progress=False)
    if backend == "none":
        assert not (tmp_path / "run" / "tensorboard").exists()
        return
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [4, 8, 12]
    for row in log:
        step = row["step"]
        for term, value in row["loss"].items():
            assert scalars[f"loss/{term}"][step] == pytest.approx(value, rel=1e-6)
        for source, value in row["fve"].items():
            assert scalars[f"fve/{source}"][step] == pytest.approx(value, rel=1e-6, abs=1e-7)
        for key in ("l0", "dead_fraction", "lr", "grad_norm"):
            assert scalars[key][step] == pytest.approx(row[key], rel=1e-6, abs=1e-9)
    assert sorted(scalars["tokens_per_s"]) == [8, 12] and all(v > 0 for v in scalars["tokens_per_s"].values())
