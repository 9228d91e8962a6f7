"""The rounds of one run: train, check, log, evaluate, checkpoint; roll back or stop.

:class:`TrainingLoop` runs an :class:`experiments.train.Experiment` from its
newest checkpoint that reads and verifies (or from the start) to its last
round; the checkpoints that fail are moved aside with a warning, and when
all fail the run stops (:class:`experiments.errors.WorkdirError`). One round, in
:meth:`TrainingLoop.run`'s order:

1. compile the round if needed (outside the clock; ``'auto'`` chooses there);
2. train it (one dispatch) and time it;
3. check it (:func:`experiments.faults.check_round`): a NaN/Inf stops the run,
   or rolls it back to the last good checkpoint (the newest before it that
   reads and verifies) with lower learning rates;
4. log the round's loss and error; evaluate when due;
5. checkpoint when due, or when a signal asked to stop (then stop).
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any, Optional

import jax
import numpy as np
import tqdm
from absl import logging

from experiments import distributed, errors, faults, metric_writer, provenance
from parle_jax import checkpoint


def _checked(restored: Optional[checkpoint.Restored]) -> str:
  """What a restore checked, for the log."""
  return ('verified against its checksums' if restored is not None and restored.verified
          else 'saved without checksums: read, not verified')


def _moved(checkpointer: checkpoint.Checkpointer, since: int = 0) -> str:
  """Which checkpoints were moved aside, and where to: ``'rounds 4, 2 moved to DIR'``."""
  moved = checkpointer.moved_aside[since:]
  rounds = ', '.join(str(round_index) for round_index, _, _ in moved)
  return (f"round{'s' * (len(moved) > 1)} {rounds} moved to {checkpointer.corrupt_directory}"
          if moved else 'none was moved aside')


def progress(plan, rounds_done: int, train_seconds: float) -> dict[str, Any]:
  """Where a run stands after `rounds_done` rounds: the fields of every record."""
  return {
      'epoch': plan.epochs(rounds_done),
      'effective_epochs': plan.effective_epochs(rounds_done),
      'gradient_evaluations': plan.gradient_evaluations(rounds_done),
      'train_seconds': train_seconds,
  }


def rollback_candidates(checkpointer: checkpoint.Checkpointer, report: faults.RoundReport,
                        diverged_round: int) -> list[int]:
  """The checkpoints before `diverged_round` that are not known to be bad, oldest first.

  A checkpoint right before the round whose very first loss is NaN/Inf holds
  params that give that loss (finite, but blown up): going back to it would
  diverge again at once, whatever the learning rates, so it is skipped. The
  newest of the others that reads and verifies is the last good one.
  """
  poisoned = diverged_round - 1 if (report.bad_loss_step == 0).any() else None
  return [r for r in checkpointer.rounds() if r < diverged_round and r != poisoned]


class TrainingLoop:
  """One run's rounds (see the module docstring); :meth:`run` returns what it ended with.

  Attributes:
    state: the replicas' state after :attr:`rounds_done` rounds.
    rounds_done: rounds trained (checkpointed or not).
    train_seconds: time spent in training rounds (compiling and evaluating excluded).
    rollbacks: rollbacks so far; lr_scale: the learning rates' factor after them.
  """

  def __init__(self, experiment, workdir: str, config_json: str,
               checkpointer: checkpoint.Checkpointer, signals: faults.StopSignals):
    self.experiment, self.workdir, self.checkpointer = experiment, workdir, checkpointer
    self.config, self.plan = experiment.config, experiment.plan
    self.config_record = json.loads(config_json)
    self.signals = signals
    saved = checkpointer.rounds()
    restored = self._restore(saved)  # verified before anything trains
    if saved and restored is None:
      raise errors.WorkdirError(
          f'no checkpoint in {checkpointer.directory} reads and verifies: '
          + _moved(checkpointer) + ' (the warnings above say why). Running the same command '
          'again starts afresh from round 0; to retry one, move it back.')
    self.lr_scale = self.record.get('learning_rate_scale', 1.0)
    if self.lr_scale != 1.0:
      experiment.scale_learning_rates(self.lr_scale)
    if self.rounds_done:
      logging.info('Resumed from the checkpoint after round %d in %s (%s; learning rates x%g)',
                   self.rounds_done, workdir, _checked(restored), self.lr_scale)
    self.train_seconds = self.record.get('train_seconds', 0.0)
    self.rollbacks = self.record.get('rollbacks', 0)
    self.results: dict[str, Any] = {}
    self._compiled = False

  def _restore(self, rounds: list[int]) -> Optional[checkpoint.Restored]:
    """The newest of `rounds` that reads and verifies, or, if none does, the start.

    The checkpoints that fail are moved aside (one warning each); every
    process ends at the same round (:meth:`checkpoint.Checkpointer.restore_intact`).
    """
    state = self.experiment.replicas.to_global(self.experiment.init_state())  # orbax's target
    try:
      restored = self.checkpointer.restore_intact(state, rounds) if rounds else None
    except checkpoint.CheckpointMismatchError as err:
      raise errors.WorkdirError(
          f'{err} Resume it with the devices and config it was saved with, or start afresh '
          '(--overwrite or another --workdir).') from err
    self.state, self.record = (state, {'round': 0}) if restored is None else (
        restored.state, restored.record)
    self.rounds_done = self.record['round']
    return restored

  def run(self) -> tuple[Any, dict[str, Any], float]:
    """Trains to the plan's last round; returns (state, last evaluation, training seconds)."""
    plan = self.plan
    self.writer = metric_writer.MetricWriter(self.workdir, resume_round=self.rounds_done)
    if distributed.is_primary():
      provenance.append(self.workdir, self.rounds_done)  # one record per start or resume
    logging.info('%s on %s: %s', plan.optimizer, self.experiment.replicas, plan)
    self.bar = tqdm.tqdm(total=plan.total_rounds, initial=self.rounds_done, unit='round',
                         disable=not self.config.progress_bar or not distributed.is_primary(),
                         dynamic_ncols=True)
    try:
      while self.rounds_done < plan.total_rounds:
        self._compile()
        report = self._train_round()
        problem = report.divergence(self.rounds_done)
        if problem is not None:
          self._roll_back_or_stop(problem, report)  # raises unless it rolled back
          continue
        final = self.rounds_done == plan.total_rounds
        self._log(report, final)
        if self.rounds_done % self._eval_every == 0 or final:
          self._evaluate()
        if report.stop or final or self.rounds_done % self.config.checkpoint_every_rounds == 0:
          self._save()
        if report.stop and not final:
          self._stop()
    finally:
      self.bar.close()
      self.writer.close()
    if not self.results:  # nothing left to train: report the saved state
      self.results = self.experiment.evaluate(self.state)
    return self.state, self.results, self.train_seconds

  @property
  def _eval_every(self) -> int:
    return self.config.eval_every_rounds or max(1, round(self.plan.rounds_per_epoch))

  def _compile(self) -> None:
    """Compiles (and for 'auto' chooses) the round, outside the clock."""
    if self._compiled:
      return
    distributed.barrier('compile')  # start together: see distributed.barrier
    round_fn = self.experiment.round_fn
    seconds = round_fn.warm_up(self.state, self.experiment.device_data)
    logging.info('compiled the round in %.1f s (of which compiling %.1f s, choosing the '
                 'mapping %.1f s): mapping %s, %s convolutions', seconds,
                 sum(round_fn.compile_seconds.values()), sum(round_fn.timings.values()),
                 round_fn.mapping, self.experiment.conv)
    self._window = ([], [], time.perf_counter())  # losses, errors, start
    self._compiled = True

  def _train_round(self) -> faults.RoundReport:
    start = time.perf_counter()
    self.state, metrics = self.experiment.round_fn(self.state, self.experiment.device_data)
    jax.block_until_ready(metrics)
    self.train_seconds += time.perf_counter() - start
    self.rounds_done += 1
    return faults.check_round(self.experiment.replicas, self.state.params, metrics,
                              self.signals.received is not None)

  def _roll_back_or_stop(self, problem: str, report: faults.RoundReport) -> None:
    """Goes back to the last good checkpoint with lower learning rates, or raises."""
    config = self.config
    diverged = self.rounds_done
    moved_before = len(self.checkpointer.moved_aside)
    # Read back and verified, so that it is named good (or rolled back to) only if it is.
    restored = self._restore(rollback_candidates(self.checkpointer, report, diverged))
    good = restored.round_index if restored is not None else None
    if config.on_divergence == 'rollback' and self.rollbacks < config.max_rollbacks:
      self.rollbacks += 1
      self.lr_scale *= config.rollback_lr_factor
      logging.warning('%s; rolling back to round %d with the learning rates x%g (rollback %d '
                      'of at most %d)', problem, good or 0, self.lr_scale, self.rollbacks,
                      config.max_rollbacks)
      self.checkpointer.delete_after(self.rounds_done)  # they lead to the divergence
      self.experiment.scale_learning_rates(self.lr_scale)
      self.writer.rewind(self.rounds_done)
      self.writer.write(self.rounds_done, {'rollback': self.rollbacks,
                                           'learning_rate_scale': self.lr_scale})
      self.bar.reset(total=self.plan.total_rounds)
      self.bar.update(self.rounds_done)
      self._compiled = False
      return
    directory = self.checkpointer.directory
    if restored is not None and restored.verified:
      kept = f'the last good checkpoint (after round {good}) in {directory} is kept'
    elif restored is not None:
      kept = (f'the last checkpoint that reads (after round {good}) in {directory} is kept '
              '(saved without checksums: not verified)')
    elif len(self.checkpointer.moved_aside) > moved_before:
      kept = (f'no checkpoint before round {diverged} reads and verifies: '
              + _moved(self.checkpointer, since=moved_before))
    else:
      kept = 'there is no good checkpoint yet'
    afresh = ('lower config.learning_rate / config.inner_learning_rate and start afresh '
              '(--overwrite or another --workdir)')
    if config.on_divergence == 'rollback':
      problem += (f' after {self.rollbacks} rollbacks (config.max_rollbacks='
                  f'{config.max_rollbacks}) with the learning rates x{self.lr_scale:g}')
      advice = f'Resume with a larger --config.max_rollbacks, or {afresh}.'
    else:
      advice = f'Resume with --config.on_divergence=rollback, or {afresh}.'
    raise faults.DivergenceError(f'Training diverged: {problem}. Stopping; {kept}. {advice}')

  def _log(self, report: faults.RoundReport, final: bool) -> None:
    losses, errors, start = self._window
    losses.append(report.metrics['loss'])
    errors.append(report.metrics['error'])
    self.bar.update(1)
    if self.rounds_done % self.config.log_every_rounds and not final:
      return
    plan = self.plan
    images = len(losses) * plan.steps_per_round * plan.batch_size * plan.num_replicas
    summary = dict(progress(plan, self.rounds_done, self.train_seconds), **{
        'train/loss': float(np.mean(losses)), 'train/error': 100 * float(np.mean(errors)),
        'images_per_second': images / (time.perf_counter() - start)})
    self.writer.write(self.rounds_done, summary)
    self.bar.set_postfix(epoch=f"{summary['epoch']:.2f}", loss=f"{summary['train/loss']:.3f}",
                         img_s=f"{summary['images_per_second']:.0f}")
    self._window = ([], [], time.perf_counter())

  def _evaluate(self) -> None:
    self.results = self.experiment.evaluate(self.state)
    self.writer.write(self.rounds_done, dict(
        self.results, **progress(self.plan, self.rounds_done, self.train_seconds)))
    if distributed.is_primary():
      self.bar.write(f"round {self.rounds_done} (epoch {self.plan.epochs(self.rounds_done):.2f})"
                     f": reference test error {self.results['reference/test_error']:.2f}%, "
                     'replicas ' + ', '.join(f'{e:.2f}%'
                                             for e in self.results['replica/test_error']))

  def _save(self) -> None:
    self.checkpointer.save(self.rounds_done, self.experiment.replicas.to_global(self.state), {
        'config': self.config_record, 'train_seconds': self.train_seconds,
        'rollbacks': self.rollbacks, 'learning_rate_scale': self.lr_scale,
        'mapping': self.experiment.round_fn.mapping, 'conv': self.experiment.conv})

  def _stop(self) -> None:
    received = self.signals.received
    name = (signal.Signals(received).name if received is not None
            else 'a signal to another process')
    raise faults.TrainingInterrupted(
        f'Stopped by {name} after round {self.rounds_done} of {self.plan.total_rounds}; the '
        f'checkpoint after round {self.rounds_done} is in {self.checkpointer.directory}. Run '
        'the same command again to resume.')
