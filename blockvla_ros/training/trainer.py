"""train(config) -> TrainResult: block-diffusion (or AR / full-diffusion) finetuning through `accelerate`.

One code path for 1 process, DDP over N GPUs / nodes / CPU processes (gloo) and FSDP: start it with `python`,
`accelerate launch` or `torchrun`. `train.batch_size` is the global batch; processes and grad_accum split it.
Everything random is a function of (seed, step, global micro-batch index), so a resumed run continues the same
loss curve, and one process with grad_accum=2 computes the same step as two processes with grad_accum=1.
One run per out_dir: the main process holds a flock on `out_dir/.lock` for the whole run; a second run on the
same folder fails at once with LockedError naming the holder (a lock left by a killed run is free again).
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..io.atomic import check_output_dir
from ..io.file_lock import FileLock
from .config import TrainConfig
from .distributed import fsdp_wrap_error, make_accelerator
from .sampler import mix_seed

log = logging.getLogger(__name__)

TRAIN_SALT, DROPOUT_SALT = 0x7EA1, 0xD50
RUN_LOCK_FILE = '.lock'  # flock-ed by the run using out_dir (released by the kernel even after SIGKILL)


@dataclass
class TrainResult:
    out_dir: str
    checkpoint: Optional[str]  # newest checkpoint = a policy folder (config.json, model.safetensors, stats.json)
    checkpoints: list  # [(step, path)] on disk at the end
    step: int  # optimizer steps done (over all invocations)
    stopped: str  # 'done' | 'max_steps' | 'time_budget' | 'signal' | 'nothing_to_do'
    train_loss: Optional[float]  # last logged train loss (mean over processes)
    val_loss: Optional[float]  # last validation loss
    samples_per_s: Optional[float]  # training throughput of this invocation (data loading included)
    data: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # this invocation's metric records
    metrics_path: Optional[str] = None
    curve_path: Optional[str] = None


def make_loss_module(policy, mode: str):
    import torch

    class LossModule(torch.nn.Module):
        """forward(batch, seed) -> (loss, info): the training loss, so DDP/FSDP wrap one module."""

        def __init__(self):
            super().__init__()
            self.policy = policy

        def forward(self, batch, seed: int):
            from ..model.losses import compute_loss

            gen = torch.Generator(device=batch.actions.device)
            gen.manual_seed(seed)
            return compute_loss(self.policy, batch, mode, generator=gen)

    return LossModule()


def _resume_from(opts, out_dir: Path) -> Optional[Path]:
    from .checkpoint import latest_checkpoint

    if opts.resume == 'never':
        return None
    if opts.resume == 'auto':
        return latest_checkpoint(out_dir)
    return Path(opts.resume)


class _StopFlag:
    """SIGTERM/SIGINT during training: finish the step, checkpoint, stop (a second signal is not caught)."""

    def __init__(self):
        self.reason = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.reason = 'signal'
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
        log.warning('signal %d: stopping after this step with a checkpoint', signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(config: TrainConfig, episodes: Optional[Sequence] = None) -> TrainResult:
    """Run (or resume) training as configured. `episodes` replaces the bags (in-memory Episode objects)."""
    import torch
    from torch.utils.data import DataLoader

    from . import assemble
    from .checkpoint import list_checkpoints, load_training_state, remove_partial_saves
    from .dataset import collate, evenly_spaced
    from .metrics import MetricsLog, plot_loss_curve
    from .optim import build_optimizer, lr_at, set_lr
    from .sampler import StepBatchSampler
    from .train_state import Saver, load_optimizer, load_trainable
    from .validation import decode_error, validation_loss

    if config.data.bags:  # recorded in train_config.yaml and val_split.json: export reads them from any directory
        config = config.replace({'data.bags': [str(Path(b).expanduser().absolute()) for b in config.data.bags]})
    opts = config.train
    accelerator = make_accelerator(opts, find_unused=config.model.get('vision', {}).get('type') == 'hf')
    main, rank, world, device = (accelerator.is_main_process, accelerator.process_index, accelerator.num_processes,
                                 accelerator.device)
    fsdp = accelerator.distributed_type.name == 'FSDP'
    out_dir = Path(opts.out_dir)
    lock = None
    try:
        if main:  # one run per folder: a second blockvla-train on it stops here, before touching anything
            check_output_dir(out_dir, 'train.out_dir')
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(out_dir / RUN_LOCK_FILE, 'training run folder').acquire()
            remove_partial_saves(out_dir)
        resume = _resume_from(opts, out_dir)
        trainable = opt_tensors = saved_stats = None
        state: dict = {}
        if resume is not None:
            from ..model.action_tokenizer import NormStats

            trainable, opt_tensors, state = load_training_state(resume)
            saved_stats = NormStats.load(resume / 'stats.json')
            log.info('resuming from %s (step %d)', resume, state['step'])
        if main:
            _refuse_mixing_runs(out_dir, resume, int(state.get('step', 0)))

        train_eps, val_eps, model_cfg, report = assemble.read_and_split(config, episodes, main and opts.progress)
        stats = assemble.resolve_stats(train_eps, model_cfg, saved_stats)
        policy = assemble.build_policy(model_cfg, config)
        data = assemble.build_data(config, policy, train_eps, val_eps, stats, report)
        del train_eps, val_eps
        start = int(state.get('step', 0))
        if resume is not None:
            _check_resume(state, config, data, world)
            load_trainable(policy, trainable, resume)

        module = make_loss_module(policy, opts.mode)
        if not fsdp:
            module.to(device)
        optimizer, names = build_optimizer(policy, opts)
        try:
            module, optimizer = accelerator.prepare(module, optimizer)
        except ValueError as e:
            raise fsdp_wrap_error(e, policy) from None
        if opt_tensors:
            load_optimizer(module, optimizer, opt_tensors, state['optimizer_groups'], names, fsdp)

        stop = min(opts.steps, opts.max_steps or opts.steps)
        sampler = StepBatchSampler(len(data.train), opts.batch_size, world, rank, opts.grad_accum, opts.seed,
                                   start, stop)
        loader = DataLoader(data.train, batch_sampler=sampler, collate_fn=collate,
                            num_workers=config.data.num_workers, pin_memory=device.type == 'cuda')
        metrics = MetricsLog(out_dir / 'metrics.jsonl', resume_step=start if resume is not None else None,
                             enabled=main)
        if main:
            config.save(out_dir / 'train_config.yaml')
            atomic_json(out_dir / 'data_summary.json', data.summary)

        val_idx = None if data.val is None else evenly_spaced(len(data.val), config.data.val_max_windows)
        decode_idx = None if val_idx is None else val_idx[evenly_spaced(len(val_idx), opts.eval_decode_samples)]
        val_batch = min(opts.batch_size, 64)  # fixed batches: the same masks whatever the process layout
        unwrapped = accelerator.unwrap_model(module)

        def evaluate(step: int) -> dict:
            if data.val is None:
                return {}
            target = module if fsdp else unwrapped  # FSDP: every process runs every batch through the wrapper
            out = validation_loss(target, data.val, val_idx, val_batch, opts.seed, device,
                                  0 if fsdp else rank, 1 if fsdp else world,
                                  None if fsdp else (lambda t: accelerator.reduce(t, 'sum')), accelerator.autocast)
            if opts.eval_decode_samples and not fsdp and main:
                with accelerator.autocast():  # bf16-stored frozen weights are only read inside autocast
                    out.update(decode_error(unwrapped.policy, data.val, decode_idx, device))
            accelerator.wait_for_everyone()
            if out:
                metrics.write({'step': step, 'split': 'val', **out})
            return out

        saver = Saver(accelerator, module, optimizer, names, policy, data, config, out_dir, fsdp)
        last_train, last_val, rate = None, None, None
        stopped = 'nothing_to_do' if start >= stop else None
        if start == 0 and stop > 0:
            last_val = evaluate(0).get('val_loss')
        it = iter(loader)
        t0 = time.monotonic()
        window = {'samples': 0, 'time': 0.0, 'loss': [], 'acc': []}
        bar = _progress(main and opts.progress, start, stop)
        with _StopFlag() as flag:
            for step in range(start, stop):
                t_step = time.monotonic()
                set_lr(optimizer, lr_at(step, opts))
                losses, accs = [], []
                for m in range(opts.grad_accum):
                    g = m * world + rank  # global micro-batch index: same masks whatever the process layout
                    batch = next(it).to(device)
                    torch.manual_seed(mix_seed(opts.seed, DROPOUT_SALT, step, g))
                    sync = contextlib.nullcontext() if m == opts.grad_accum - 1 else accelerator.no_sync(module)
                    with sync:
                        loss, info = module(batch, seed=mix_seed(opts.seed, TRAIN_SALT, step, g))
                        accelerator.backward(loss / opts.grad_accum)
                    losses.append(info['loss'])
                    accs.append(info['masked_acc'])
                grad_norm = (accelerator.clip_grad_norm_(module.parameters(), opts.grad_clip)
                             if opts.grad_clip > 0 else None)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                window['samples'] += opts.batch_size
                window['time'] += time.monotonic() - t_step
                window['loss'].append(sum(losses) / len(losses))
                window['acc'].append(sum(accs) / len(accs))
                if opts.time_budget_s is not None and time.monotonic() - t0 > opts.time_budget_s:
                    flag.reason = flag.reason or 'time_budget'
                stopping = _agree(accelerator, flag.reason is not None) or done == stop
                if done % opts.log_interval == 0 or stopping:
                    red = accelerator.reduce(torch.tensor([sum(window['loss']) / len(window['loss']),
                                                           sum(window['acc']) / len(window['acc'])],
                                                          device=device), 'mean').tolist()
                    rate = window['samples'] / max(window['time'], 1e-9)
                    last_train = red[0]
                    metrics.write({'step': done, 'split': 'train', 'loss': red[0], 'masked_acc': red[1],
                                   'lr': lr_at(step, opts),
                                   'grad_norm': None if grad_norm is None else float(grad_norm),
                                   'samples_per_s': rate, 'epoch': sampler.epoch_at(done),
                                   'time_s': time.monotonic() - t0})
                    window = {'samples': 0, 'time': 0.0, 'loss': [], 'acc': []}
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f'{losses[-1]:.4f}', samples_s=f'{rate or 0:.1f}')
                if done % opts.eval_interval == 0 or stopping:
                    last_val = evaluate(done).get('val_loss', last_val)
                if done % opts.save_interval == 0 or stopping:
                    saver.save(done)
                if stopping:
                    stopped = 'done' if done == opts.steps else flag.reason or 'max_steps'
                    break
        if bar is not None:
            bar.close()
        del it
        curve = None
        if main:
            curve = plot_loss_curve(out_dir / 'metrics.jsonl', out_dir / 'loss_curve.png',
                                    f'{opts.mode} - {out_dir.name}')
        accelerator.wait_for_everyone()
        ckpts = [(s, str(p)) for s, p in list_checkpoints(out_dir)]
        result = TrainResult(out_dir=str(out_dir), checkpoint=ckpts[-1][1] if ckpts else None, checkpoints=ckpts,
                             step=max(start, saver.last_step or 0), stopped=stopped or 'done',
                             train_loss=last_train, val_loss=last_val, samples_per_s=rate, data=data.summary,
                             history=metrics.records, metrics_path=str(out_dir / 'metrics.jsonl'),
                             curve_path=str(curve) if curve else None)
        if main:
            atomic_json(out_dir / 'result.json', {k: v for k, v in asdict(result).items() if k != 'history'})
        return result
    finally:
        _release(accelerator)
        if lock is not None:
            lock.release()


def _refuse_mixing_runs(out_dir: Path, resume: Optional[Path], start: int) -> None:
    """A run never writes into a folder holding checkpoints past its starting step: the saver keeps an existing
    step_N (so the folder would mix two runs' weights), pruning deletes the old ones and metrics.jsonl is restarted."""
    from .checkpoint import list_checkpoints

    later = [step for step, _ in list_checkpoints(out_dir) if step > start]
    if not later:
        return
    steps = f'{later[:3]}{"..." * (len(later) > 3)}'
    held = f'train.out_dir {out_dir} already holds checkpoints of another run (steps {steps})'
    if resume is None:
        raise ValueError(f'{held}: resume it (train.resume=auto), or pick another train.out_dir; nothing was changed')
    raise ValueError(f'{held} past step {start} of {resume}: this run would mix with them; pick another '
                     'train.out_dir (or move those checkpoints away); nothing was changed')


def _check_resume(state: dict, config: TrainConfig, data, world: int) -> None:
    if state.get('mode') != config.train.mode:
        raise ValueError(f'the checkpoint was trained with mode {state.get("mode")!r}, this run is '
                         f'{config.train.mode!r}; use another train.out_dir or train.resume=never')
    if state.get('global_batch') != config.train.batch_size:
        log.warning('resuming with batch_size %d (checkpoint: %s): the data order will not continue the old run',
                    config.train.batch_size, state.get('global_batch'))
    if state.get('data_fingerprint') != data.fingerprint:
        log.warning('the episodes or their split differ from the checkpoint being resumed (dataset changed?)')
    if state.get('world_size') != world:
        log.info('resuming on %d processes (checkpoint: %s); same global batch and data order', world,
                 state.get('world_size'))


def _agree(accelerator, flag: bool) -> bool:
    """True on every process if any process wants to stop."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, 'sum').item() > 0)


def _progress(enabled: bool, start: int, stop: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=stop, initial=start, desc='training', unit='step', dynamic_ncols=True)


def _release(accelerator) -> None:
    """Let a later train() in the same process pick other accelerate settings (single-process runs only)."""
    import torch

    if not torch.distributed.is_initialized():
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()


def atomic_json(path: Path, data: dict) -> None:
    from ..io.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str))
