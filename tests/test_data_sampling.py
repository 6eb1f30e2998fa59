"""--data-sampling: resampled draws (default) or seeded epochs, validated and wired to the loader; a run
in epochs mode that is stopped by a signal and resumed repeats an uninterrupted one step for step,
across an epoch boundary. (Resampled resume is checked by tests/test_train.py.)"""
from __future__ import annotations

import json
import signal

import pytest

from pretrain.checkpoints import checkpoint
from pretrain.settings.config import ConfigError, build_config
from pretrain.runtime.dist import DistEnv
from pretrain.runtime.signals import EXIT_PREEMPTED
from tests.test_train_support import embedded, launch, records, train_args, wait, wait_for  # noqa: F401

# 64 samples per epoch at a global batch of 16: 4 steps per epoch, so 7 steps cross one boundary
EPOCH_ARGS = ("--data-sampling", "epochs", "--train-num-samples", "64", "--batch-size", "16", "--steps", "7",
              "--zeroshot-data", "none", "--retrieval-data", "none", "--debug-nan", "")


def _env(world: int = 1) -> DistEnv:
    return DistEnv(rank=0, local_rank=0, world_size=world, master_addr="127.0.0.1", master_port=0, launcher="single")


def _config(embedded, tmp_path, *flags, world: int = 1, check_files: bool = True):
    argv = ["--train-data", f"embedded:{embedded}/shards", "--tokenizer", str(embedded / "tokenizer"),
            "--output-dir", str(tmp_path / "run"), "--batch-size", "8", "--model", "tiny-test",
            "--zeroshot-data", "none", "--retrieval-data", "none", *flags]
    return build_config(argv, _env(world), cuda=False, check_files=check_files)


def test_flag_is_validated_and_reaches_the_loader(embedded, tmp_path):
    from data.tokenizer import Tokenizer
    from models import get_model_config
    from pretrain.train.engine import TrainState
    from pretrain.train.feed import Feed
    assert _config(embedded, tmp_path).data_sampling == "resampled"
    cfg = _config(embedded, tmp_path, "--data-sampling", "epochs", "--train-num-samples", "64", "--workers", "1")
    assert cfg.data_sampling == "epochs"
    tok = Tokenizer.load(str(embedded / "tokenizer"))
    for c, mode in ((cfg, "epochs"), (_config(embedded, tmp_path, "--workers", "1"), "resampled")):
        feed = Feed(c, _env(), tok, get_model_config("tiny-test", vocab_size=tok.vocab_size), TrainState())
        try:
            assert feed.loader.dataset.mode == mode
            assert next(feed)["images"].shape[0] == 8
        finally:
            feed.close()
    (tmp_path / "bad.yaml").write_text("data_sampling: shuffled\n")
    with pytest.raises(ConfigError, match="--data-sampling 'shuffled' must be one of resampled, epochs"):
        _config(embedded, tmp_path, "--config", str(tmp_path / "bad.yaml"), check_files=False)
    # the 16 embedded training shards cannot give 2 ranks x 16 workers a whole shard each
    with pytest.raises(ConfigError, match="--data-sampling epochs: Epoch mode splits whole shards .* 16 shards "
                                          "for 2 ranks x 16 workers"):
        _config(embedded, tmp_path, "--data-sampling", "epochs", "--workers", "16", world=2)
    _config(embedded, tmp_path, "--workers", "16", world=2)  # resampled mode takes any shard count


def test_epochs_mode_resumes_exactly_across_an_epoch_boundary(embedded, tmp_path):
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    codes, out = wait(launch(train_args(embedded, ref_run, *EPOCH_ARGS)))
    assert codes == [0, 0], out[-4000:]
    ref = {r["step"]: r["loss"] for r in records(ref_run)}
    assert sorted(ref) == list(range(1, 8))
    final = json.loads((checkpoint.find_latest(ref_run / "checkpoints") / checkpoint.MANIFEST).read_text())
    assert final["client_state"]["data_epoch"] == 1 and final["client_state"]["data_batches"] == 3

    args = train_args(embedded, run, *EPOCH_ARGS, "--resume", "latest")
    procs = launch(args)
    wait_for(lambda: len(records(run)) >= 2, procs)
    procs[0].send_signal(signal.SIGUSR1)
    codes, out = wait(procs)
    assert codes == [EXIT_PREEMPTED] * 2, out[-4000:]
    stopped = [r for r in records(run, "event") if r.get("event") == "preempted"][-1]["step"]
    assert stopped < 7
    codes, out = wait(launch(args))
    assert codes == [0, 0], out[-4000:]
    got = {r["step"]: r["loss"] for r in records(run)}
    assert sorted(got) == list(range(1, 8))
    for step in range(1, 8):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), (step, stopped, got, ref)
