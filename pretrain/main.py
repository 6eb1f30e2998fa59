"""Pre-training entry point: `deepspeed pretrain/main.py --deepspeed_config ds_configs/zero3_bf16.json ...`

Also runs under `torchrun --nproc_per_node N pretrain/main.py ...`, `srun python pretrain/main.py ...`
or plain `python pretrain/main.py ...` (one process). Exit codes: 0 done; 2 configuration error
(every rank, message on rank 0); 3 aborted on repeated non-finite losses; 4 the training data failed
(pretrain/runtime/failfast.py; 1 for any other failure, on every rank); 124 (EXIT_PREEMPTED) stopped by
SIGUSR1/SIGTERM after writing a checkpoint: requeue and `--resume latest`.
"""
from __future__ import annotations

import faulthandler
import json
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed pretrain/main.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pretrain.checkpoints import checkpoint, reshard
from pretrain.runtime import dist as pdist, seeding
from pretrain.runtime.collectives import barrier, init_distributed
from pretrain.runtime.failfast import FailFast, default_store, fail_and_exit
from pretrain.runtime.signals import EXIT_CONFIG, EXIT_PREEMPTED, StopFlag
from pretrain.settings.config import ConfigError, TrainConfig, build_config, parse

EXIT_NONFINITE = 3


def build_model(cfg: TrainConfig, tokenizer):
    from models import create_model
    from pretrain.settings.validate import vocab_override
    kwargs = vocab_override(cfg.model, tokenizer.vocab_size)
    if cfg.zero_init and cfg.zero_stage == 3:
        import deepspeed  # parameters are partitioned as they are created: ViT-H sized models
        with deepspeed.zero.Init(config_dict_or_path=cfg.deepspeed_dict()):
            model = create_model(cfg.model, **kwargs)
    else:
        model = create_model(cfg.model, **kwargs)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_and_resume(cfg: TrainConfig, env: pdist.DistEnv, model, teacher, log=print):
    """The engine (and EMA), with --resume's checkpoint loaded: (engine, ema, tag_dir, client_state).

    A tag written by another number of ranks is converted to a universal checkpoint first
    (pretrain/checkpoints/reshard.py). tag_dir is None for a fresh start. Collective.
    """
    from pretrain.train import engine as eng
    tag_dir = checkpoint.resolve_resume(cfg.resume, cfg.checkpoint_dir, env.world_size, log=log, other_world=True)
    saved_world = checkpoint.saved_world_size(tag_dir) if tag_dir is not None else None
    universal = reshard.prepare(tag_dir, saved_world, env.world_size, env.is_main, log)
    engine, ema = eng.build_engine(cfg, model, eng.build_loss(cfg, env.rank, env.world_size), teacher, env.rank,
                                   universal=universal is not None)
    if tag_dir is None:
        return engine, ema, None, {}
    client_state = checkpoint.load(engine, universal or tag_dir)
    if ema is not None:
        reshard.load_ema(ema, tag_dir, saved_world or env.world_size)
    return engine, ema, tag_dir, client_state


def run(cfg: TrainConfig, env: pdist.DistEnv, log, stop: StopFlag) -> int:
    from data.tokenizer import Tokenizer
    from models import get_model_config
    from pretrain.train import engine as eng
    from pretrain.evaluate.evalsets import EvalOptions, EvalRunner
    from pretrain.train.feed import Feed, FeedOptions

    seeding.seed_weights(cfg.seed)  # same initial weights on every rank
    model_cfg = get_model_config(cfg.model)
    tokenizer = Tokenizer.load(cfg.tokenizer, context_length=model_cfg.text.context_length)
    model = build_model(cfg, tokenizer)
    model_cfg = model.config
    if env.is_main:  # the export CLI rebuilds the model from these two, without the training flags
        model_cfg.to_json(Path(cfg.output_dir) / "model_config.json")
        tokenizer.save(Path(cfg.output_dir) / "tokenizer")
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log.info(f"model {cfg.model}: {n_params / 1e6:.2f} M parameters; loss {cfg.loss}; "
             f"ZeRO stage {cfg.zero_stage}; world size {env.world_size}")
    teacher = None
    if cfg.ema_modalities:
        from pretrain.train.teacher import build_teacher
        teacher = build_teacher(model, build=lambda: build_model(cfg, tokenizer))
        log.info(f"EMA teacher (decay {cfg.ema_decay}) for the {' and '.join(cfg.ema_modalities)} targets")
    if cfg.target_sources:
        log.info("soft-target features: " + ", ".join(f"{m} {s}" for m, s in cfg.target_sources.items()))
    engine, ema, tag_dir, client_state = build_and_resume(cfg, env, model, teacher, log.info)

    state = eng.TrainState(data_seed=cfg.seed)
    if tag_dir is not None:
        state = eng.TrainState.from_client_state(client_state)
        log.info(f"resumed from {tag_dir} at step {state.step} ({state.samples_seen} samples seen)")
    dropped = log.drop_after(state.step)  # records of an abandoned trajectory (see pretrain/observe/runlog.py)
    if dropped:
        log.info(f"log: {dropped} records past step {state.step} moved to log.abandoned.jsonl")
    if tag_dir is not None:
        log.write({"kind": "event", "event": "resume", "step": state.step, "tag": str(tag_dir)})
    log.advance(state.step)
    seeding.seed_training(cfg.seed, env.rank, state.step)  # per-rank dropout masks from here on

    feed = Feed(FeedOptions.of(cfg), env, tokenizer, model_cfg, state)
    evals = EvalRunner(EvalOptions.of(cfg), env, tokenizer, model_cfg, log)
    saved_at = {state.step} if tag_dir is not None else set()

    def save() -> None:
        if state.step in saved_at:
            return
        if ema is not None:  # per-rank file in the tag, on disk before the manifest lists the tag's files
            ema.save(cfg.checkpoint_dir / checkpoint.tag_for(state.step))
        checkpoint.save(engine, cfg.checkpoint_dir, state.step, state.client_state(), is_main=env.is_main,
                        world_size=env.world_size, keep=cfg.keep_checkpoints, barrier=barrier)
        saved_at.add(state.step)
        log.write({"kind": "event", "event": "checkpoint", "step": state.step})

    def on_step_end(step: int) -> None:
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            state.history.append(evals.run(engine, step))
        if cfg.save_every and step % cfg.save_every == 0:
            save()

    try:
        outcome = eng.train(engine, feed, cfg, state, log.log, stop, on_step_end, ema)
    except eng.NonFiniteLoss as e:
        log.info(f"error: {e}")
        log.write({"kind": "event", "event": "abort_nonfinite", "step": state.step, "message": str(e)})
        return EXIT_NONFINITE
    finally:
        feed.close()
    if outcome == "stopped":
        save()
        # the ranks agree to stop when any of them got the signal; this one may not have
        got = stop.name or "a stop signal on another rank"
        log.info(f"received {got}: checkpoint at step {state.step} written; exiting with "
                 f"{EXIT_PREEMPTED} (resume with --resume latest)")
        log.write({"kind": "event", "event": "preempted", "signal": stop.name or "another rank", "step": state.step})
        return EXIT_PREEMPTED
    final = evals.run(engine, state.step, final=True)
    state.history.append(final)
    save()
    if env.is_main:
        evals.write_results(final, state.history, {"model": cfg.model, "loss": cfg.loss, "steps": cfg.steps})
    log.info(f"done: {state.step} steps; results in {Path(cfg.output_dir) / 'results.json'}")
    if env.is_main:
        from pretrain.observe.telemetry import summary_of_log
        log.info(f"throughput: {summary_of_log(Path(cfg.output_dir) / 'log.jsonl')}")
    return 0


def save_config(cfg: TrainConfig, log) -> None:
    """RUN/config.json is the resolved config of the latest start; every different earlier one is kept
    as config.previous-N.json (N = 1, 2, ... in order), none overwritten."""
    path = Path(cfg.output_dir) / "config.json"
    new = cfg.to_dict()
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != json.loads(json.dumps(new.get(k))))
        if changed:
            n = 1
            while path.with_name(f"config.previous-{n}.json").exists():
                n += 1
            path.replace(path.with_name(f"config.previous-{n}.json"))
            log.info(f"config: differs from the previous start in {', '.join(changed)} "
                     f"(old one kept as config.previous-{n}.json)")
    cfg.save(path)


def fail_at_end_for_tests(rank: int) -> None:
    """Test hook (tests/test_faults.py): SOFTCLIP_TEST_FAIL_AT_END=R raises a DataError on rank R a few
    seconds after its run finished, when its peers are waiting at the final barrier."""
    if os.environ.get("SOFTCLIP_TEST_FAIL_AT_END") == str(rank):
        import time
        from data.tario import DataError
        time.sleep(5)
        raise DataError("injected by SOFTCLIP_TEST_FAIL_AT_END after the run finished")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        _, _, local_rank = parse(argv)
        env = pdist.from_environ(local_rank_arg=local_rank)
    except (ConfigError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)  # cannot tell which rank this is: every one says it
        return EXIT_CONFIG
    try:
        cfg = build_config(argv, env, cuda=torch.cuda.is_available())
    except ConfigError as e:
        if env.is_main:  # every rank fails the same checks; one copy of the message is enough
            print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if cfg.workers > 0:
        from pretrain.runtime.workers import start_worker_server
        start_worker_server()
    from pretrain.observe.runlog import RunLog
    # From here on SIGUSR1/SIGTERM only set a flag: a signal during start-up is acted on after the
    # first step (checkpoint, EXIT_PREEMPTED) instead of killing the rank with no exit code to requeue on.
    stop = StopFlag().install()
    init_distributed(env, cuda=torch.cuda.is_available(), tf32=cfg.tf32)
    log = RunLog(cfg.output_dir, enabled=env.is_main, report_to=cfg.report_to, total_steps=cfg.steps,
                 wandb_project=cfg.wandb_project, run_config=cfg.to_dict())
    if env.is_main:
        save_config(cfg, log)
    for line in cfg.derived:
        log.info(f"config: {line}")
    watch = FailFast(default_store(), env.rank, env.world_size).start()
    try:
        try:
            code = run(cfg, env, log, stop)
            fail_at_end_for_tests(env.rank)
            # The final barrier, on the store with the watcher on: a rank failing after the others
            # finished ends them with its code (a process-group barrier would hold NCCL peers for
            # the group's timeout); rank 0, which hosts the store, leaves last.
            watch.finish()
        except Exception as e:  # any rank's failure ends every rank, with one exit code (pretrain/runtime/failfast.py)
            fail_and_exit(e, watch, env.rank, log)
        return code
    finally:
        stop.uninstall()
        log.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    # A native crash (SIGSEGV/SIGABRT/SIGBUS in gloo, NCCL or another extension) would otherwise end the
    # rank with no word in its log: print every thread's Python stack to stderr first. The exit status
    # stays the signal's, and the peers still end through the failfast watcher. Set here, by the
    # process's entry point, so that a caller of main() keeps its own handler.
    faulthandler.enable(all_threads=True)
    # DeepSpeed 0.19's ZeRO-3 calls torch.distributed.all_gather_into_tensor and reduce_scatter_tensor, which
    # torch 2.14 deprecates, at every step, and something in the step clears Python's record of warnings
    # already shown (any warnings.catch_warnings does): every rank printed both warnings at every step,
    # about 0.4 KB a step, 3 MB per rank in 3,000 steps; a "once" filter still printed them 21 times in
    # 10 steps. They concern DeepSpeed's code, not a user's: not shown.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    sys.exit(main())
