"""One training loop for every defence.

``train(config, run_dir)`` builds data, model, objective, optimiser (SGD / Adam) and an lr schedule
(constant, piecewise, cosine, one-cycle; stepped per iteration), then runs epochs with a progress bar.
After each epoch it measures validation clean accuracy (and PGD accuracy at the run's eps when the
objective or the selection rule needs it), appends a history row, saves the best weights by the
selection metric, and checkpoints everything needed to resume. Interrupted runs resume from the last
finished epoch; a finished run is never overwritten unless ``overwrite=True``. Started by ``torchrun``,
the same loop trains data-parallel (:mod:`robustlab.distributed`): every rank trains on its share of
each batch, rank 0 validates, writes the run directory and tests.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab import distributed
from robustlab.attacks import pgd
from robustlab.config import RunConfig, build_config
from robustlab.data import DatasetSplits, TensorLoader
from robustlab.defenses import Objective, TrainState, build_objective
from robustlab.defenses.preprocessing import auxiliary_loss
from robustlab.devices import bf16_autocast
from robustlab.errors import CheckpointError, ConfigError, RobustlabError
from robustlab.metrics import accuracy, robust_accuracy
from robustlab.progress import progress_bar, progress_line
from robustlab.rundir import (
    RunDir,
    first_line,
    load_resume_state,
    load_weights,
    read_csv,
    read_json,
    save_resume_state,
    save_weights,
    write_csv,
)
from robustlab.runs import prepare_data, prepare_model, seed_everything, select_device

# Names that moved to training_recipe / training_state stay importable from here, as before.
from robustlab.training_recipe import (  # noqa: F401
    STALL_EPOCHS,
    _measures_val_robust,
    _selection_rule,
    make_optimizer,
    make_scheduler,
    stalled_at_chance,
    training_uses_eps,
)
from robustlab.training_state import (  # noqa: F401
    _flatten,
    _prepare_run_dir,
    _restore_rng,
    _rng_state,
    environment,
    git_state,
    peak_memory_mb,
    restore_selected_weights,
)


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    model: nn.Module
    data: DatasetSplits


#: Steps between two host reads of the running training statistics (progress bar, non-finite check).
#: Between reads a step queues its work and moves on: nothing in it waits for the accelerator.
STATS_EVERY = 25
#: Keyword arguments of ``nn.Module.compile`` under ``train.compile``.
COMPILE_OPTIONS: dict[str, Any] = {}


class RunningStats:
    """An epoch's sums of the loss and of each step's statistics, kept on the device.

    :meth:`add` costs two small device kernels and no host read; :meth:`read` is the one
    device-to-host copy, made every :data:`STATS_EVERY` steps and at the end of the epoch. The summed
    loss is what the non-finite check reads: a nan or inf loss in any step keeps the sum non-finite.
    """

    def __init__(self) -> None:
        self.steps = 0
        self._sums: dict[tuple[str, ...], torch.Tensor] = {}  # key: the tensor stats' names, loss first
        self._floats: dict[str, float] = {}

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor | float]) -> None:
        """Add one step's loss and stats (0-d tensors, summed on their device; floats, on the host)."""
        names = ("_loss", *(k for k, v in stats.items() if isinstance(v, torch.Tensor)))
        values = torch.stack([loss.detach().float(), *(stats[k].detach().float() for k in names[1:])])
        previous = self._sums.get(names)
        self._sums[names] = values if previous is None else previous + values
        for key, value in stats.items():
            if not isinstance(value, torch.Tensor):
                self._floats[key] = self._floats.get(key, 0.0) + float(value)
        self.steps += 1

    def read(self) -> tuple[float, dict[str, float]]:
        """(the summed loss, the summed stats): one host read of everything accumulated so far."""
        loss, sums = 0.0, {}
        for names, values in self._sums.items():
            for name, value in zip(names, values.tolist(), strict=True):
                if name == "_loss":
                    loss += value
                else:
                    sums[name] = sums.get(name, 0.0) + value
        return loss, {**sums, **self._floats}


class Trainer:
    """Runs one config to completion in one run directory."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        overwrite: bool = False,
        progress: bool = True,
        data: DatasetSplits | None = None,
    ) -> None:
        self.config = config
        self.run = RunDir(run_dir)
        self.device = select_device(config.train.device)
        self.dist = distributed.setup(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":  # one GPU per rank
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.progress = progress and self.dist.is_main
        seed_everything(config.seed, config.train.deterministic)
        self.data = data if data is not None else prepare_data(config)
        if len(self.data.val) == 0:  # validation selects the checkpoint (and sets the hybrid's alpha)
            raise ConfigError("data.val_size: training needs at least 1 validation image")
        if self.dist.world_size > min(config.train.batch_size, len(self.data.train)):
            raise ConfigError(
                f"train.batch_size: {config.train.batch_size} cannot be split across {self.dist.world_size} processes"
            )
        self.model = prepare_model(config, self.data).to(self.device)
        if self.dist.enabled:
            distributed.broadcast_state(self.model)
        # one process trains a run directory at a time (as the cells of an experiment); under torchrun rank 0
        # owns it. Held until fit() returns.
        self.lock = self.run.lock() if self.dist.is_main else None
        # only now, with data and model in hand: a config that cannot load leaves no empty run directory
        # behind, and --overwrite never deletes a run for one that cannot train
        try:
            self.resuming = self._prepare_run_dir(overwrite)
        except BaseException:
            self._unlock()
            raise
        if config.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if config.train.compile:  # in place: the state dict keeps its keys, isinstance checks still hold
            self.model.compile(**COMPILE_OPTIONS)
        self.objective: Objective = build_objective(config.defense.name, config.defense.params)
        augment = self.data.default_augment if config.data.augment == "auto" else config.data.augment
        self.loader = TensorLoader(
            self.data.train.images, self.data.train.labels, config.train.batch_size,
            shuffle=True, augment=augment, device=self.device, seed=config.seed,
            drop_last=len(self.data.train) > config.train.batch_size,
            shard=(self.dist.rank, self.dist.world_size),
        )
        self.optimizer = make_optimizer(self.model, config)
        self.scheduler = make_scheduler(self.optimizer, config, len(self.loader))
        self.history: list[dict[str, Any]] = []
        self.best_score = -math.inf
        #: the selected epoch's weights (also in model.safetensors), kept for resume.pt
        self.selected: dict[str, torch.Tensor] = {}
        self.start_epoch = 0
        self.generator = torch.Generator().manual_seed(config.seed + 1)

    def _draw_apart_from_rank_0(self, epoch: int) -> None:
        """Give a rank > 0 its own random starts and dropout masks for ``epoch`` (rank 0 draws as one process
        would, and its random state travels in resume.pt). Seeded afresh every epoch, so that a run
        resumed after any epoch draws what the uninterrupted run draws."""
        seed = self.config.seed + 7919 * self.dist.rank + 104_729 * epoch
        torch.manual_seed(seed)
        self.generator.manual_seed(seed + 1)

    def _prepare_run_dir(self, overwrite: bool) -> bool:
        """Rank 0 creates or validates the run directory; every rank gets its answer (or its error)."""
        if not self.dist.enabled:
            return _prepare_run_dir(self.run, self.config, overwrite)
        outcome: bool | RobustlabError | None = None
        if self.dist.is_main:
            try:
                outcome = _prepare_run_dir(self.run, self.config, overwrite)
            except RobustlabError as error:
                outcome = error
        outcome = distributed.broadcast(outcome)
        if isinstance(outcome, RobustlabError):
            raise outcome
        return bool(outcome)

    # --- checkpointing -------------------------------------------------------------------------
    def _save_checkpoint(self, epoch: int) -> None:
        """Write the epoch's files; ``resume.pt`` (written last, atomically) is the one consistent snapshot.

        It holds the weights too: a kill between two of these writes must not pair one epoch's weights
        with the previous epoch's optimiser state. ``last.safetensors`` is the shareable copy. It also
        holds the selected weights, so ``resume.pt`` alone carries an unfinished run to another machine
        (an experiment's results directory commits it; weight files stay out of git).
        """
        save_weights(self.run.last_weights, self.model)
        write_csv(self.run.history, self.history)
        save_resume_state(
            self.run.resume,
            {
                "epoch": epoch,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(),
                "generator": self.generator.get_state(),
                "best_score": self.best_score,
                "objective": self.objective.state_dict(),
                "selected": self.selected,
            },
        )

    def _resume(self) -> None:
        state = load_resume_state(self.run.resume)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            _restore_rng(state["rng"])
            self.generator.set_state(state["generator"])
            self.best_score = float(state["best_score"])
            self.objective.load_state_dict(state["objective"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            reason = f"{type(error).__name__}: {first_line(error)}"
            raise CheckpointError(
                f"{self.run.resume} does not fit this run ({reason}); pass --overwrite to start again"
            ) from None
        self.selected = state.get("selected") or {}
        if not self.run.weights.exists() and self.dist.is_main:
            restore_selected_weights(self.run.path)
        self.start_epoch = int(state["epoch"]) + 1
        self.history = read_csv(self.run.history)[: self.start_epoch]
        if [row.get("epoch") for row in self.history] != list(range(1, self.start_epoch + 1)):
            raise CheckpointError(
                f"{self.run.history} lacks rows of the {self.start_epoch} finished epoch(s) that {self.run.resume} "
                "records (truncated or edited); pass --overwrite to start again"
            )

    # --- validation ----------------------------------------------------------------------------
    def _validate(self) -> dict[str, float]:
        """Validation metrics, measured by rank 0 (with its BatchNorm statistics) and shared with all ranks."""
        if not self.dist.enabled:
            return self._measure_validation()
        distributed.broadcast_state(self.model)
        return distributed.broadcast(self._measure_validation() if self.dist.is_main else None)

    def _measure_validation(self) -> dict[str, float]:
        t = self.config.train
        self.model.eval()
        metrics = {"val_clean_acc": accuracy(self.model, self.data.val)}
        if _measures_val_robust(self.objective, self.config):
            eps, norm = self.config.threat.eps, self.config.threat.norm
            attack = partial(
                pgd, eps=eps, norm=norm, steps=t.val_attack_steps, generator=self.generator, early_stop=True
            )
            subset = self.data.val.head(t.val_robust_size)
            metrics["val_robust_acc"] = robust_accuracy(self.model, subset, attack)
            # the clean accuracy of the same images, for a ratio of the two (the hybrid's alpha)
            metrics["val_robust_clean_acc"] = (
                metrics["val_clean_acc"] if len(subset) == len(self.data.val) else accuracy(self.model, subset)
            )
        return metrics

    def _select(self) -> str:
        return _selection_rule(self.objective, self.config)

    def _score(self, metrics: dict[str, float], epoch: int) -> float:
        """The selection score of an epoch; an eps warm-up epoch scores below every full-budget one."""
        if epoch < self.objective.full_budget_epoch:
            return -math.inf
        select = self._select()
        if select == "last":
            return math.inf
        return metrics["val_robust_acc" if select == "val_robust" else "val_clean_acc"]

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to the last epoch (resuming if possible); on Ctrl-C say how to resume, then re-raise."""
        try:
            return self._fit()
        except KeyboardInterrupt:
            print(f"\ninterrupted: {self.run.path} keeps every finished epoch; rerun the same command to resume",
                  file=sys.stderr)
            raise
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def _fit(self) -> TrainResult:
        config, run = self.config, self.run
        main = self.dist.is_main
        if self.resuming:
            self._resume()
            if main:  # epochs may now be timed on another machine: say where each stretch ran
                resumes = read_json(run.metadata).get("resumes", []) if run.metadata.exists() else []
                run.update_metadata(resumes=[*resumes, {"from_epoch": self.start_epoch + 1, **environment()}])
        elif main:
            run.update_metadata(
                status="running", seed=config.seed, environment=environment(), device=str(self.device),
                data=self.data.describe(), defense=config.defense.name,
                parameters=sum(p.numel() for p in self.model.parameters()), world_size=self.dist.world_size,
            )
        state = TrainState(
            epochs=config.train.epochs, steps_per_epoch=len(self.loader), eps=config.threat.eps,
            norm=config.threat.norm, generator=self.generator,
        )
        state.step = self.start_epoch * state.steps_per_epoch
        bar = progress_bar(
            total=config.train.epochs * len(self.loader), initial=state.step, enabled=self.progress,
            desc=f"{config.defense.name} {config.model.name}/{config.data.dataset}",
        )
        for epoch in range(self.start_epoch, config.train.epochs):
            if self.dist.rank:
                self._draw_apart_from_rank_0(epoch)
            state.epoch = epoch
            state.log.clear()
            self.loader.set_epoch(epoch)
            row: dict[str, Any] = {"epoch": epoch + 1, **self.objective.on_epoch_start(state)}
            started = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            running = RunningStats()
            for x, y in self.loader:
                self.train_step(x, y, state, running)
                bar.update(1)
                if running.steps % STATS_EVERY == 0:
                    self._read_stats(running, epoch, bar)
            sums = self._read_stats(running, epoch, bar)  # before anything of this epoch is saved
            seconds = time.perf_counter() - started
            if self.dist.enabled:
                sums = distributed.mean_over_ranks(sums, self.device)
            row.update({f"train_{k}": v / len(self.loader) for k, v in sums.items()})
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            val = self._validate()
            row.update(val)
            row.update(self.objective.on_epoch_end(state, dict(row)))
            if self.dist.enabled:  # alpha comes from rank 0's validation: its objective state holds
                self.objective.load_state_dict(distributed.broadcast(self.objective.state_dict()))
            row["epoch_seconds"] = round(seconds, 3)
            row["peak_memory_mb"] = round(peak_memory_mb(self.device), 1)
            self.history.append(row)
            if main and stalled_at_chance(self.history, self.data.num_classes) and not stalled_at_chance(
                self.history[:-1], self.data.num_classes
            ):
                state.log.append(
                    f"stalled: val clean accuracy at chance for {STALL_EPOCHS} epochs; lower train.lr, or "
                    "warm the budget up (defense.eps_warmup) for adversarial training at a large eps"
                )
                progress_line(f"warning: {self.run.path}: {state.log[-1]}", file=sys.stderr)
            if state.log:
                row["events"] = " | ".join(state.log)
            score = self._score(val, epoch)
            if score >= self.best_score or epoch == 0:
                self.best_score = max(score, self.best_score)
                if main:
                    save_weights(run.weights, self.model)
                    self.selected = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                row["selected"] = 1
            if main:
                self._save_checkpoint(epoch)
            progress_line(self._epoch_line(row), enabled=self.progress)
        bar.close()
        return self._finish()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, state: TrainState, running: RunningStats) -> None:
        """One optimiser step on the batch ``(x, y)``; its loss and stats go into ``running``.

        Nothing here reads a device tensor on the host, so on a GPU the step only queues work: under
        ``train.amp`` the objective (its crafting attack included) runs in bfloat16 autocast, under
        ``train.channels_last`` the batch is laid out channels-last like the model's weights.
        """
        train = self.config.train
        if train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.model.train()
        with bf16_autocast(self.device, train.amp):
            loss, stats = self.objective.loss(self.model, x, y, state)
            transform_loss = auxiliary_loss(self.model, x)
        if transform_loss is not None:
            loss = loss + transform_loss
            stats["transform_loss"] = transform_loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist.enabled:  # the global batch's loss: every rank sees a non-finite loss anywhere
            loss = distributed.average_gradients(self.model.parameters(), loss, len(x))
        self.optimizer.step()
        self.scheduler.step()
        state.step += 1
        running.add(loss, stats)

    def _read_stats(self, running: RunningStats, epoch: int, bar: Any) -> dict[str, float]:
        """Read ``running`` on the host: stop a diverged run, show the epoch's means so far, return the sums.

        Read every :data:`STATS_EVERY` steps and at the end of each epoch, so a non-finite loss stops
        the run within that many steps, and always before the epoch's weights are saved.
        """
        loss, sums = running.read()
        if not math.isfinite(loss):
            raise RobustlabError(f"training diverged at epoch {epoch + 1} (loss is {loss}); lower train.lr")
        steps = max(1, running.steps)
        bar.set_postfix({k: f"{v / steps:.3f}" for k, v in sums.items() if k in ("loss", "acc", "adv_acc", "eps_t")})
        return sums

    @staticmethod
    def _epoch_line(row: dict[str, Any]) -> str:
        keys = ["train_loss", "val_clean_acc", "val_robust_acc", "eps_t", "alpha", "epoch_seconds"]
        parts = [f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), float | int)]
        return f"epoch {row['epoch']}: " + " ".join(parts)

    def _finish(self) -> TrainResult:
        """Test the selected weights and record the cost (rank 0; the other ranks get its metrics)."""
        metrics = self._test_and_record() if self.dist.is_main else None
        if self.dist.enabled:
            metrics = distributed.broadcast(metrics)
            # the selected epoch, as rank 0 loaded it: sent, not read from rank 0's run directory, which
            # another node (or a rank's throw-away directory, as for the audit's surrogate) does not see
            distributed.broadcast_state(self.model)
            self.model.eval()
        return TrainResult(self.run.path, self.history, metrics, self.model, self.data)

    def _test_and_record(self) -> dict[str, Any]:
        run = self.run
        load_weights(run.weights, self.model)
        self.model.eval()
        train_seconds = float(sum(r.get("epoch_seconds") or 0 for r in self.history))
        epochs = max(1, len(self.history))
        metrics = {
            "clean_accuracy": accuracy(self.model, self.data.test),
            "test_size": len(self.data.test),
            "cost": {
                "train_seconds": round(train_seconds, 3),
                "seconds_per_epoch": round(train_seconds / epochs, 3),
                "peak_memory_mb": max((r.get("peak_memory_mb") or 0) for r in self.history),
                "device": str(self.device),
                "world_size": self.dist.world_size,
            },
            "selected_epoch": max((int(r["epoch"]) for r in self.history if r.get("selected")), default=epochs),
        }
        run.update_metrics(**metrics)
        run.update_metadata(status="finished")
        return metrics


def train(
    config: RunConfig | dict[str, Any],
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    data: DatasetSplits | None = None,
) -> TrainResult:
    """Train ``config`` into ``run_dir`` (resuming an unfinished run there) and return the result."""
    if not isinstance(config, RunConfig):
        config = build_config(config)
    return Trainer(config, run_dir, overwrite=overwrite, progress=progress, data=data).fit()
