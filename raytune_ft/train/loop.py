"""The per-worker training run that Ray Train runs: one readable recipe (`Recipe`) wiring the small components.

Same code on 1 worker, N workers on one node and N nodes: data come through Ray's object store, checkpoints
through Ray Train's storage, the process group is set up by TorchTrainer (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from raytune_ft.config.schema import ExperimentConfig
from raytune_ft.train.batches import StepPlan, collate
from raytune_ft.train.checkpoint import (
    DS_TAG,
    PROBE_GENERATIONS,
    STATE,
    TRAINABLE,
    CheckpointError,
    check_same_model,
    checkpoint_name,
    config_hash,
    list_checkpoints,
    model_record,
    newest_whole_checkpoint,
    verify_checkpoint,
    weights_only_loads,
    write_manifest,
)
from raytune_ft.train.ds_config import deepspeed_config, import_deepspeed, resolved_precision
from raytune_ft.train.engine import enable_activation_checkpointing, make_optimizer, start_engine
from raytune_ft.train.evaluate import (
    evaluate,
    generation_metrics,
    over_ranks,
    probe_generations,
    probe_logits,
    task_loss,
)
from raytune_ft.train.hooks import StepHooks
from raytune_ft.train.measure import SteadyClock, model_sizes, peak_rss_mb, rss_mb
from raytune_ft.train.schedule import EarlyStopping, apply_configured_hyperparameters, lr_scheduler
from raytune_ft.train.task_mix import TaskMix, TaskStream


def train_loop(config: dict[str, Any], hooks: Sequence[StepHooks] = ()) -> None:
    """Ray Train's train_loop_per_worker: build this worker's recipe and run it. CONFIG is read, never written.

    HOOKS are how code outside the recipe joins a run, at the points raytune_ft/train/hooks.py names: the caller
    hands Ray Train `functools.partial(train_loop, hooks=[...])`, which Ray pickles to every worker with the hook
    objects in it (their class must be importable there). The benchmark's figures (raytune_ft/bench/train.py) and
    the tests' fault injection (tests/integration/faults.py) come in this way; the recipe knows neither."""
    Recipe(config, hooks).run()


class Recipe:
    """One worker's fine-tuning run, as torchtune's recipes are: `setup` (model, data, the checkpoint it resumes
    from, engine), `train` (optimizer steps; an evaluation, a report and a checkpoint when due), `evaluate`,
    `save`, `cleanup`. What the run holds lives on `self`; the parts it wires live in their own modules (batches,
    task_mix, engine, evaluate, checkpoint, measure)."""

    def __init__(self, config: Mapping[str, Any], hooks: Sequence[StepHooks] = ()) -> None:
        self.started_at = time.time()
        # what the run imports, loaded before the memory figures' baseline
        import ray.train.torch  # noqa: F401
        import safetensors.torch  # noqa: F401

        import raytune_ft.modeling  # noqa: F401

        self.rss_at_start = rss_mb()
        self.config = MappingProxyType(dict(config))  # read-only: Ray Train hands every restart the same dict
        self.hooks = list(hooks)
        self.cfg = ExperimentConfig.model_validate(config["experiment"])
        self.classes: list[str] = config["classes"] or []
        self.pad_id: int = config["pad_token_id"]
        self.tasks: list[dict[str, Any]] = config.get("tasks") or []
        self.resume_dir: Path | None = None  # the checkpoint it resumes from, and that checkpoint's state
        self.saved: dict[str, Any] = {}
        self.start = 0
        self.history: list[dict[str, Any]] = []
        self.resumed: dict[str, Any] = {}  # what the first report after a resume adds
        self.retain: dict[str, list] | None = None
        self.retain_base: float | None = None  # the retain set's score before any step of the run
        self.ewc: Any = None
        self.engine: Any = None
        self._zero3_config: Any = None
        self.clock = SteadyClock()
        self.running_loss: Any = 0.0  # summed since the last report; a tensor once a step has run
        self.micro_count = 0

    def run(self) -> None:
        """Set up, train (or report the checkpoint again when it left nothing to train), clean up."""
        try:
            self.setup()
            if self.nothing_left():
                self.report_again()
            else:
                self.train()
        finally:
            self.cleanup()

    # ------------------------------------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Everything before the first step. Stops after choosing the checkpoint when it leaves nothing to train."""
        import ray
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if self.cfg.scaling.use_gpu else torch.device("cpu")
        data = ray.get(self.config["data"])
        self.train_rows, self.val_rows = data["train"], data["validation"]
        self.build_model()
        self.plan_steps()
        self.choose_checkpoint()
        if self.nothing_left():
            return
        self.setup_ewc()
        self.start_engine()
        if self.resume_dir is not None:
            self.load_checkpoint()
        if self.config.get("retain"):
            self.setup_retain()

    def build_model(self) -> None:
        from raytune_ft.modeling import build_model

        cfg = self.cfg
        self.precision = resolved_precision(cfg, torch.cuda.is_available())
        self.ds_config = deepspeed_config(cfg, self.precision, _hidden_size(cfg))
        if cfg.deepspeed.zero_stage == 3:
            import_deepspeed()  # before transformers' DeepSpeed integration imports it
            from transformers.integrations import HfDeepSpeedConfig

            # While this object lives, from_pretrained builds the model already partitioned (deepspeed.zero.Init):
            # no worker ever holds the whole model, so ZeRO-3 fits models larger than one worker's memory.
            # (kept until cleanup: transformers holds only a weak reference)
            self._zero3_config = HfDeepSpeedConfig(self.ds_config)
        torch.manual_seed(cfg.seed)  # identical initial heads on every rank
        model = build_model(cfg.model, cfg.finetune, len(self.classes) or None, cfg.data.label_names)
        if self.tasks:
            from raytune_ft.modeling.multitask import MultiTaskModel, TaskHead

            heads = [TaskHead(t["name"], t["task"], len(t["classes"] or []) or None) for t in self.tasks]
            model = MultiTaskModel(model, cfg.multitask.primary, heads)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.model = model
        self.tokenizer: Any = None  # chat: generated answers are decoded to be scored
        if cfg.model.task == "chat":
            from raytune_ft.model_source import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
        # packed rows: one block-diagonal mask per row on CPU, flash-attention's varlen layout where it runs
        self.attention = "varlen" if cfg.model.attn_implementation == "flash_attention_2" else "block"
        self.mask_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        if cfg.model.task == "chat" and cfg.data.chat.packing:
            from raytune_ft.train.packing import check_supports_packing

            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            check_supports_packing(base, self.attention)  # type: ignore[arg-type]
        # which model this run trains: written into every checkpoint's state, compared before one is loaded
        self.model_record = model_record(model, cfg.model.name_or_path)

    def plan_steps(self) -> None:
        """The step plan, how many steps, when to evaluate and save, and each task's rows and loss."""
        cfg, tasks = self.cfg, self.tasks
        self.plan = StepPlan.of(cfg, self.train_rows, self.world)
        self.plan.check()
        # several tasks share the steps, so their count is train.max_steps (the config requires it), not epochs
        self.total = cfg.train.max_steps if tasks else self.plan.total_steps
        self.eval_every = cfg.train.eval_every_steps or self.plan.steps_per_epoch
        self.ckpt_every = cfg.train.checkpoint_every_steps or self.eval_every
        classification = cfg.model.task == "sequence-classification"
        weights = self.config.get("class_weights")
        class_weights = (
            torch.tensor([weights[c] for c in self.classes], dtype=torch.float32, device=self.device)
            if classification and weights
            else None
        )
        self.loss_of = partial(task_loss, classification=classification, class_weights=class_weights)
        primary = TaskStream(
            cfg.multitask.primary if tasks else None,
            self.plan,
            self.train_rows,
            self.val_rows,
            self.loss_of,
            cfg.multitask.primary_loss_weight if tasks else 1.0,
            self.classes,
            cfg.data.label_names,
        )
        extras = [_task_stream(t, i, cfg, self.world) for i, t in enumerate(tasks)]
        self.mix = TaskMix(primary, extras, self.total, cfg.multitask.sampling, cfg.multitask.temperature, cfg.seed)
        self.stopper = EarlyStopping.of(cfg)

    def choose_checkpoint(self) -> None:
        """The checkpoint to resume from, if any (self.resume_dir, its state in self.saved), checked to fit."""
        import ray.train

        config, rank = self.config, self.rank
        ckpt = ray.train.get_checkpoint()
        if ckpt is None and config.get("restore_from"):
            # a checkpoint from outside this run (a Tune trial restarting, or exploiting a PBT donor); the run's
            # own checkpoints, written after it, win when Ray Train restarts the workers
            source = config["restore_from"]
            ckpt = source if isinstance(source, ray.train.Checkpoint) else ray.train.Checkpoint(source)
        newest_own = None
        if config.get("run_storage"):
            # Ray Train registers a checkpoint when its controller next polls the workers (every 2 s): a worker
            # that dies sooner leaves a whole checkpoint in this run's storage that Ray does not hand back. Use it.
            known = Path(ckpt.path).name if ckpt is not None else ""  # Ray's latest, or the restore (always older)
            own = [p for p in list_checkpoints(Path(config["run_storage"])) if p.name > known]
            newest_own = newest_whole_checkpoint(own, log=lambda m: _log(rank, m))
            if newest_own is not None:
                ckpt = ray.train.Checkpoint(str(newest_own[0]))
        if ckpt is None:
            if config.get("require_checkpoint"):
                raise CheckpointError("resume was asked for but the run has no checkpoint")
            return
        local = Path(ckpt.to_directory()) if not Path(ckpt.path).is_dir() else Path(ckpt.path)
        try:
            self.saved = newest_own[1] if newest_own is not None else verify_checkpoint(local)  # verified once
            self.resume_dir = local
        except CheckpointError as exc:
            _log(rank, f"newest checkpoint is not whole ({exc}); looking for an older one")
            found = newest_whole_checkpoint(
                [p for p in list_checkpoints(local.parent) if p.name < local.name], log=lambda m: _log(rank, m)
            )
            if found is None:
                raise CheckpointError(f"no whole checkpoint to resume from in {local.parent}") from exc
            self.resume_dir, self.saved = found
            _log(rank, f"resuming from the previous good checkpoint {self.resume_dir.name}")
        # another model's checkpoint is refused by name here, not by a shape mismatch inside DeepSpeed's loader
        check_same_model(self.resume_dir, self.saved, self.model_record)
        if self.saved.get("world_size") != self.world:
            raise CheckpointError(
                f"{self.resume_dir}: saved with {self.saved.get('world_size')} workers, resumed with {self.world}; "
                "ZeRO shards need the same number of workers (set scaling.num_workers)"
            )
        if self.saved.get("config_hash") != config_hash(config["experiment"]):
            _log(rank, "the config differs from the checkpoint's (e.g. a PBT exploit): its hyper-parameters apply")

    def nothing_left(self) -> bool:
        """The checkpoint it resumes from ends the run (finished, early-stopped or at the last step)."""
        return self.resume_dir is not None and bool(self.saved.get("finished") or int(self.saved["step"]) >= self.total)

    def setup_ewc(self) -> None:
        cfg = self.cfg
        if cfg.finetune.ewc is None:
            return
        from raytune_ft.modeling import EWC, estimate_fisher

        if self.resume_dir is not None:
            from safetensors.torch import load_file

            tensors = load_file(str(self.resume_dir / "ewc.safetensors"))
            self.ewc = EWC.from_tensors(self.model, tensors, cfg.finetune.ewc.strength)
            return
        # Fisher of the pre-trained weights, from this rank's slice of a fixed sample, averaged over ranks.
        sample = self.plan.permutation(-1)[: cfg.finetune.ewc.fisher_samples].tolist()[self.rank :: self.world]
        cpu = torch.device("cpu")
        batches = [collate(self.train_rows, sample[i : i + 8], self.pad_id, cpu) for i in range(0, len(sample), 8)]
        fisher = estimate_fisher(self.model, batches, self.loss_of, cfg.finetune.ewc.fisher_samples)
        if self.world > 1:
            for tensor in fisher.values():
                on_device = tensor.to(self.device)  # NCCL reduces CUDA tensors only
                torch.distributed.all_reduce(on_device)
                tensor.copy_(on_device.cpu() / self.world)
        self.ewc = EWC(self.model, fisher, cfg.finetune.ewc.strength)

    def start_engine(self) -> None:
        """Parameter groups (layer-wise LR decay, gradual unfreezing), optimizer, LR schedule, DeepSpeed engine."""
        from raytune_ft.modeling import num_layers, param_groups, unfreeze_gate

        cfg, model = self.cfg, self.model
        groups = param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.finetune.layerwise_lr_decay)
        gate = unfreeze_gate(cfg.finetune.gradual_unfreeze, num_layers(model))
        optimizer = make_optimizer(cfg, groups, self.device.type == "cuda")
        self.configured = [(g["lr"], g["weight_decay"]) for g in groups]  # before the scheduler scales lr
        self.scheduler = lr_scheduler(optimizer, groups, gate, self.total, cfg)
        self.sizes = model_sizes(model)
        self.engine = start_engine(cfg, model, optimizer, self.scheduler, self.ds_config)
        self.engine_ready_at = time.time()

    def load_checkpoint(self) -> None:
        """Weights, optimizer, LR schedule, RNG, early stopping and history from self.resume_dir."""
        from safetensors.torch import load_file

        resume_dir, engine = self.resume_dir, self.engine
        load_began = time.perf_counter()
        frozen = any(not p.requires_grad for p in engine.module.parameters())
        with weights_only_loads():  # DeepSpeed itself would unpickle anything in these files
            load_path, _ = engine.load_checkpoint(
                str(resume_dir), tag=DS_TAG, load_lr_scheduler_states=True, load_module_strict=not frozen
            )
        if load_path is None:  # DeepSpeed returns quietly when it finds nothing
            raise CheckpointError(f"{resume_dir}: DeepSpeed found no checkpoint under tag '{DS_TAG}'")
        apply_configured_hyperparameters(self.scheduler, self.configured)
        rng = load_file(str(resume_dir / f"rng.rank{self.rank}.safetensors"))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self.start = int(self.saved["step"])
        self.stopper.restore(self.saved.get("early_stopping", {}))
        self.history = list(self.saved.get("history", []))
        self.resumed = {"resumed_step": self.start, "load_checkpoint_s": time.perf_counter() - load_began}
        _log(self.rank, f"resumed at step {self.start} of {self.total} from {resume_dir.name}")

    def setup_retain(self) -> None:
        """The retain set, and its score before any step of this run (the pre-trained model; kept across resumes):
        the reference every evaluation's eval_retain_worse_by is measured against."""
        import ray

        self.retain = ray.get(self.config["retain"])
        self.retain_base = self.saved.get("retain_base")
        if self.retain_base is None:
            self.retain_base = self.retain_score()

    # ------------------------------------------------------------------------------------------------- train

    def train(self) -> None:
        """Steps from `start` to `total`, each followed by what is due: an evaluation, a report, a checkpoint."""
        self.engine.train()
        for step in range(self.start, self.total):
            for hook in self.hooks:
                hook.on_step_start(self, step)
            self.train_step(step)
            done = step + 1
            if any([hook.on_step_end(self, done) for hook in self.hooks]):  # a list: every hook is called
                return
            if self.due(done) and self.report(done):
                return

    def train_step(self, step: int) -> None:
        """One optimizer step: its task's micro-batches, forward and backward each, DeepSpeed's step after each
        (it updates the weights at the last micro-batch of the accumulation)."""
        began = time.perf_counter()
        samples = tokens = 0
        stream, micro_batches = self.mix.step(step, self.rank)
        for rows in micro_batches:
            batch = collate(stream.train, rows, self.pad_id, self.device, self.attention, self.mask_dtype)
            loss = self.loss(stream, batch)
            self.engine.backward(loss)
            for hook in self.hooks:
                hook.after_backward(self, step)
            self.engine.step()
            self.running_loss += loss.detach()  # a tensor: reading it (a device sync) waits until the next report
            self.micro_count += 1
            samples += len(rows)
            tokens += sum(len(stream.train["input_ids"][i]) for i in rows)  # not the padding
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # a step's time is its kernels', not how fast Python queued them
        self.clock.step_done(began, samples, tokens)

    def loss(self, stream: TaskStream, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task's loss, weighted, with the L1 and EWC penalties."""
        from raytune_ft.modeling import l1_penalty

        loss = stream.loss(self.engine, batch)
        if stream.weight != 1.0:
            loss = loss * stream.weight
        if self.cfg.finetune.l1:
            loss = loss + self.cfg.finetune.l1 * l1_penalty(self.engine.module)
        if self.ewc is not None:
            loss = loss + self.ewc.penalty(self.engine.module)
        return loss

    def due(self, done: int) -> bool:
        """An evaluation (and a report) is due after DONE steps."""
        return done % self.eval_every == 0 or done % self.ckpt_every == 0 or done == self.total

    def report(self, done: int) -> bool:
        """Evaluate, decide on early stopping, report (with a checkpoint when one is due). True: stop here."""
        import ray.train

        metrics = self.evaluate()
        metrics.update(self.train_figures(done))
        metrics.update(self.resumed)  # the first report after a resume says where it resumed and what loading cost
        self.resumed = {}
        stop_key = self.cfg.train.early_stopping.metric if self.cfg.train.early_stopping else None
        should_stop = False
        if stop_key is not None:
            if stop_key not in metrics:
                raise KeyError(
                    f"train.early_stopping.metric '{stop_key}' is not reported; choose from {sorted(metrics)}"
                )
            should_stop = self.stopper.update(float(metrics[stop_key]))
        metrics["early_stopped"] = should_stop
        metrics["total_steps"] = self.total  # so a reader can tell a finished run from a stopped one
        self.history.append({k: v for k, v in metrics.items() if "/" not in k})
        if self.rank == 0:
            _log(self.rank, progress_line(metrics, self.total, self.plan.global_batch))
        if done % self.ckpt_every == 0 or done == self.total or should_stop:
            self.save(done, metrics)
        else:
            ray.train.report(metrics)
        if should_stop:
            _log(
                self.rank,
                f"early stopping at step {done}: {stop_key} did not improve for {self.stopper.patience} evaluations",
            )
        return should_stop

    def train_figures(self, done: int) -> dict[str, Any]:
        """Where training stands and how fast it goes since the last report (whose running loss it resets)."""
        figures = {
            "step": done,
            "epoch": round(done / self.plan.steps_per_epoch, 4),
            "train_loss": over_ranks(float(self.running_loss) / max(1, self.micro_count), self.world, self.device),
            "lr": self.scheduler.get_last_lr()[0],
            **self.rates(),
            "first_step_at": self.clock.first_step_at,
            "peak_rss_mb": over_ranks(peak_rss_mb(), self.world, self.device, "max"),
        }
        self.running_loss, self.micro_count = 0.0, 0
        return figures

    def rates(self) -> dict[str, float | None]:
        """samples_per_s and tokens_per_s of the steady-state steps, summed over workers (each rank's count over
        its own seconds). A collective: every rank calls it."""
        seconds = self.clock.seconds
        return {
            f"{what}_per_s": over_ranks(count / seconds, self.world, self.device) * self.world if seconds else None
            for what, count in (("samples", self.clock.samples), ("tokens", self.clock.tokens))
        }

    # ---------------------------------------------------------------------------------------------- evaluate

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics of the primary task; each extra task's and eval_combined_loss; the retain set's."""
        metrics = self.evaluate_on(self.val_rows, self.classes)
        if self.tokenizer is not None:
            metrics.update(
                generation_metrics(
                    self.engine, self.val_rows, self.rank, self.world, self.cfg, self.pad_id, self.tokenizer
                )
            )
        if self.tasks:
            metrics.update(self.task_metrics(metrics))
        if self.retain is not None:
            metrics.update(self.retain_metrics())
        return metrics

    def evaluate_on(self, rows: dict[str, list], classes: list[str], **task: Any) -> dict[str, Any]:
        return evaluate(self.engine, rows, self.rank, self.world, self.cfg, classes, self.pad_id, self.device, **task)

    def task_metrics(self, primary: dict[str, Any]) -> dict[str, Any]:
        """eval_<task>_loss, _accuracy, _f1_macro or _perplexity per extra task, and eval_combined_loss: the
        loss-weighted mean of every task's validation loss, the objective Tune can optimise for all tasks at once."""
        out: dict[str, Any] = {}
        weighted, weights = self.mix.primary.weight * primary["eval_loss"], self.mix.primary.weight
        for stream in self.mix.streams.values():
            if stream is self.mix.primary:
                continue
            got = self.evaluate_on(stream.val, stream.classes, task=stream.name, names=stream.names)
            for key in ("eval_loss", "eval_accuracy", "eval_f1_macro", "eval_perplexity"):
                if key in got:
                    out[f"eval_{stream.name}_{key.removeprefix('eval_')}"] = got[key]
            weighted += stream.weight * got["eval_loss"]
            weights += stream.weight
        out["eval_combined_loss"] = weighted / weights
        return out

    def retain_score(self) -> float:
        scored = self.evaluate_on(self.retain, self.classes)
        return scored["eval_accuracy"] if self.classes else scored["eval_perplexity"]

    def retain_metrics(self) -> dict[str, Any]:
        """eval_retain_accuracy (classifier) or eval_retain_perplexity (causal LM) on train.retain_path, and
        eval_retain_worse_by: how much worse than before the first step (positive = forgotten), what
        tune.max_forgetting stops a trial on."""
        from raytune_ft.evaluation.scoring import forgetting

        metric = "accuracy" if self.classes else "perplexity"
        value = self.retain_score()
        return {
            f"eval_retain_{metric}": value,
            "eval_retain_before": self.retain_base,
            "eval_retain_worse_by": forgetting(self.retain_base, value, metric)["worse_by"],
        }

    # -------------------------------------------------------------------------------------------------- save

    def save(self, step: int, metrics: dict[str, Any]) -> None:
        """Write checkpoint STEP (every rank its shards), make it whole (this rank's manifest), report it."""
        import ray.train

        directory = self.write_checkpoint(step, metrics)
        for hook in self.hooks:
            hook.on_checkpoint_written(self, step, directory)
        write_manifest(directory, self.rank)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=checkpoint_name(step),
        )
        shutil.rmtree(directory, ignore_errors=True)

    def write_checkpoint(self, step: int, metrics: dict[str, Any]) -> Path:
        """This rank's files of checkpoint STEP in a new temporary directory: DeepSpeed's shards and RNG state;
        on rank 0 also the trainable weights whole, the probe logits, EWC's tensors and the run's state."""
        from safetensors.torch import save_file

        deepspeed = import_deepspeed()
        engine, rank = self.engine, self.rank
        tmp = Path(tempfile.mkdtemp(prefix=f"raytune-ft-ckpt-r{rank}-"))
        # Frozen weights are the pre-trained ones every process loads anyway: a LoRA checkpoint holds megabytes.
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
        trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        if self.cfg.deepspeed.zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
                tensors = {n: p.detach().float().cpu().clone() for n, p in trainable}
        else:
            tensors = {n: p.detach().float().cpu().clone() for n, p in trainable}
        probe = probe_logits(engine, self.val_rows, self.pad_id, self.device)
        generated = (
            probe_generations(engine, self.val_rows, self.cfg, self.pad_id, self.tokenizer, self.world)
            if self.tokenizer is not None
            else {}
        )
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / f"rng.rank{rank}.safetensors"))
        if rank == 0:
            save_file(tensors, str(tmp / TRAINABLE))
            save_file({"logits": probe}, str(tmp / "probe_logits.safetensors"))
            if generated:
                (tmp / PROBE_GENERATIONS).write_text(json.dumps(generated))
            if self.ewc is not None:
                save_file(self.ewc.state_tensors(), str(tmp / "ewc.safetensors"))
            (tmp / STATE).write_text(json.dumps(self.checkpoint_state(step, metrics), indent=1, default=float))
        for extra in ("zero_to_fp32.py", "zero_to_torch.py"):
            (tmp / extra).unlink(missing_ok=True)  # DeepSpeed's helper scripts: code, not state
        return tmp

    def checkpoint_state(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint says of the run (state.json): where it stands, for resuming and for readers."""
        trial = self.config.get("trial") or {}
        per_epoch = self.plan.steps_per_epoch
        return {
            "step": step,
            "epoch": metrics["epoch"],
            "world_size": self.world,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "config_hash": config_hash(self.config["experiment"]),
            "model": self.model_record,
            "metrics": metrics,
            "early_stopping": self.stopper.state(),
            "history": self.history,
            # where the data stream stands: the next step reads rows from this epoch's permutation at this offset
            "data_position": {"epoch": step // per_epoch, "step_in_epoch": step % per_epoch},
            "total_steps": self.total,
            "retain_base": self.retain_base,
            # under Tune: which trial wrote this and with which sampled values (PBT's exploit record reads them)
            "trial_id": trial.get("id"),
            "trial_config": trial.get("config"),
            "finished": step >= self.total or bool(metrics.get("early_stopped")),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def report_again(self) -> None:
        """The checkpoint it resumes from reported again (rank 0 a copy: it may sit where Ray Train would write
        it; the other ranks the metrics), so that a run with nothing left to train ends on its final result."""
        import ray.train

        step = int(self.saved["step"])
        _log(
            self.rank, f"{self.resume_dir.name} is the last checkpoint (step {step} of {self.total}); nothing to train"
        )
        metrics = {**self.saved["metrics"], "resumed_step": step}
        if self.rank != 0:
            ray.train.report(metrics)
            return
        tmp = Path(tempfile.mkdtemp(prefix="raytune-ft-ckpt-again-"))
        shutil.copytree(self.resume_dir, tmp, dirs_exist_ok=True)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=checkpoint_name(int(metrics["step"])),
        )
        shutil.rmtree(tmp, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------- clean-up

    def cleanup(self) -> None:
        """Ends ZeRO-3's partitioned construction (transformers reads it while the object lives) and lets the
        engine, model and data go."""
        self._zero3_config = None
        self.engine = self.model = self.ewc = self.retain = None


def _hidden_size(cfg: ExperimentConfig) -> int | None:
    from transformers import AutoConfig

    from raytune_ft.model_source import resolve_model_source

    config = AutoConfig.from_pretrained(
        resolve_model_source(cfg.model.name_or_path),
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", None)
    return int(size) if size else None


def _task_stream(task: dict[str, Any], index: int, cfg: ExperimentConfig, world: int) -> TaskStream:
    """An extra task of a multi-task run: its own rows, shuffled with its own seed, its head's loss."""
    import ray

    data = ray.get(task["data"])
    plan = StepPlan(
        n_train=len(data["train"]["input_ids"]),
        micro_batch=cfg.train.batch_size,
        world_size=world,
        grad_accum=cfg.train.grad_accum,
        epochs=cfg.train.epochs,
        max_steps=None,
        seed=cfg.seed + 1 + index,
    )
    try:
        plan.check()
    except ValueError as exc:
        raise ValueError(f"task '{task['name']}': {exc}") from None
    classification = task["task"] == "sequence-classification"
    loss = partial(task_loss, classification=classification, class_weights=None, task=task["name"])
    val = {k: v for k, v in data["validation"].items() if k != "slices"}  # slices are the primary task's
    return TaskStream(
        task["name"], plan, data["train"], val, loss, task["loss_weight"], task["classes"] or [], task["label_names"]
    )


def progress_line(metrics: dict[str, Any], total: int, global_batch: int) -> str:
    """What a person follows during a run: step, losses, the headline metrics, speed and time left."""
    done = metrics["step"]
    shown = [f"step {done}/{total}", f"train_loss {metrics['train_loss']:.4f}"]
    keys = ("eval_loss", "eval_accuracy", "eval_f1_macro", "eval_whole_accuracy", "eval_perplexity")
    for key in (*keys, "eval_gen_exact", "eval_gen_contains", "eval_gen_token_f1"):
        if key in metrics:
            shown.append(f"{key} {metrics[key]:.4f}")
    rate = metrics.get("samples_per_s") or 0
    if rate > 0:
        shown.append(f"{rate:.1f} samples/s, ETA {(total - done) * global_batch / rate / 60:.1f} min")
    return " | ".join(shown)


def _log(rank: int, message: str) -> None:
    # Not print(): Ray Train's workers patch print to log each line through the root logger and also echo it when
    # sys.stdout is wrapped, as Ray's workers wrap it, so every line reached the driver twice.
    sys.stdout.write(f"[raytune-ft rank {rank}] {message}\n")
    sys.stdout.flush()
