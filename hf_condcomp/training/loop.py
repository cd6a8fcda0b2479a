"""The training loop of the transformers no-trainer examples with exact resume: the accelerator,
the learning-rate schedule, `save_state` checkpoints and finding them again, logged losses."""

import hashlib
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from .arguments import parallel_flags, parallel_sizes
from .checkpoints import CHECKPOINT_DIR, STATE_FILE
from .errors import RecipeError
from .models import count_parameters, make_optimizer


def make_accelerator(args):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    kwargs = {}
    if args.with_tracking:
        kwargs.update(log_with=args.report_to, project_dir=str(Path(args.output_dir) / "runs"))
    if parallel_sizes(args) and not _has_device():
        kwargs["cpu"] = True  # torchrun on CPU processes: gloo, one process per rank (accelerate would see one)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # The sampler is re-seeded per epoch (seed + epoch), so a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=_process_group_kwargs(),
        **kwargs,
    )
    set_seed(args.seed)
    check_engine(accelerator, args)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        # The recipes end by writing the whole model: ZeRO-3 must gather its partitions for that.
        plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return accelerator


def _has_device() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, ...) rather than CPUs only."""
    from accelerate.utils.imports import get_torch_accelerator_backend

    return get_torch_accelerator_backend()[0] is not None


def _process_group_kwargs() -> list:
    """DeepSpeed on CPU processes (`DS_ACCELERATOR=cpu accelerate launch --use_deepspeed`): accelerate finds no
    device backend, lets DeepSpeed start the process group and still counts one process, so that every rank
    would read every batch. Naming DeepSpeed's backend (gloo on the CPU) makes it count the group's processes."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("true", "1") or "LOCAL_RANK" not in os.environ:
        return []
    if _has_device() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1"):
        return []
    from accelerate.utils import InitProcessGroupKwargs
    from deepspeed.accelerator import get_accelerator

    return [InitProcessGroupKwargs(backend=get_accelerator().communication_backend_name())]


# What `accelerate launch` asks for (the variables it sets for its workers) and the engine it must give.
_ASKED = {"ACCELERATE_USE_DEEPSPEED": "DEEPSPEED", "ACCELERATE_USE_FSDP": "FSDP"}


def check_engine(accelerator, args=None):
    """Refuse a launch whose engine is not the one the launcher asked for: accelerate runs plain DDP under
    `ACCELERATE_USE_CPU=1` whatever `--use_deepspeed` or an FSDP config says, and a world of processes that
    accelerate does not count would read the same batches on every rank. transformers' engine
    (`--fsdp_size`, `--ep_size`) shards the model itself: accelerate must not wrap it again."""
    got = accelerator.distributed_type.value
    for variable, engine in _ASKED.items():
        if os.environ.get(variable, "").lower() in ("true", "1") and got != engine:
            raise RecipeError(
                f"the launch asked for {engine} ({variable}=true) and accelerate set up {got}: on a CPU machine "
                f"launch DeepSpeed as `DS_ACCELERATOR=cpu accelerate launch --num_processes N --use_deepspeed "
                f"...` without ACCELERATE_USE_CPU; accelerate's FSDP needs GPUs (docs/scaling.md).")
    world = _world_size()
    if world != accelerator.num_processes:
        raise RecipeError(
            f"torch.distributed has {world} processes but accelerate sees {accelerator.num_processes} ({got}): each "
            "process would read the same batches. Launch with `accelerate launch --num_processes N` (and, for "
            "DeepSpeed on the CPU, DS_ACCELERATOR=cpu).")
    sizes = parallel_sizes(args) if args is not None else {}
    if sizes:
        flags = parallel_flags(args)
        if got in _ASKED.values():
            raise RecipeError(f"`{flags}` asks transformers' engine to shard the model and the launch asked "
                              f"accelerate for {got}: use one, e.g. `torchrun --nproc_per_node N` without "
                              "--use_deepspeed or an FSDP config (docs/scaling.md).")
        if args.fsdp_size * args.tp_size != accelerator.num_processes:
            raise RecipeError(f"`{flags}` needs fsdp_size x tp_size = {args.fsdp_size * args.tp_size} processes and "
                              f"the launch has {accelerator.num_processes}: launch `torchrun --nproc_per_node "
                              f"{args.fsdp_size * args.tp_size}` or pass `--fsdp_size {accelerator.num_processes}`.")
    if args is not None and got == "DEEPSPEED":
        _match_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, args)


def _match_deepspeed(config, args):
    """DeepSpeed accumulates and clips itself: its settings are the recipe's. An "auto" (what `accelerate
    launch --use_deepspeed` leaves unset) takes the recipe's value; a different number is refused."""
    clip = float(args.max_grad_norm or 0.0)  # 0: DeepSpeed does not clip
    for key, flag, ours, fix in (
        ("gradient_accumulation_steps", "gradient_accumulation_steps", args.gradient_accumulation_steps,
         "--gradient_accumulation_steps"),
        ("gradient_clipping", "max_grad_norm", clip, "--gradient_clipping"),
    ):
        theirs = config.get(key, "auto")
        if theirs == "auto":
            config[key] = ours
        elif float(theirs) != float(ours):
            raise RecipeError(f"`--{flag}` {ours} and DeepSpeed's {key} {theirs} differ: pass the same number to "
                              f"`accelerate launch {fix}` (or the DeepSpeed config) and to the recipe.")


def _world_size() -> int:
    """torch.distributed's world size, 1 where no process group runs."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def engine_record(accelerator, model=None) -> dict:
    """The engine a run trained with, as all_results.json records it, read off what really ran: the
    prepared model's class (DeepSpeed's engine and the ZeRO stage it runs, or a model transformers
    sharded at load time with how many of its parameters are DTensors), accelerate's view and the
    world size of torch.distributed."""
    record = {"distributed_type": accelerator.distributed_type.value, "num_processes": accelerator.num_processes,
              "world_size": _world_size()}
    if model is None:
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            record["zero_stage"] = plugin.zero_stage
        return record
    record["engine"] = "accelerate"
    if type(model).__name__ == "DeepSpeedEngine":
        import deepspeed.comm

        record.update(engine="deepspeed", zero_stage=model.zero_optimization_stage(),
                      world_size=deepspeed.comm.get_world_size())
    net = accelerator.unwrap_model(model)
    if getattr(net, "is_distributed_loading_by_transformers", False):
        from torch.distributed.tensor import DTensor

        config = net.config.distributed_config
        params = list(net.parameters())
        record.update(engine="transformers", fsdp_size=config.fsdp_size, ep_size=config.ep_size,
                      tp_size=config.tp_size, dp_size=config.dp_size,
                      dtensor_parameters=sum(isinstance(p, DTensor) for p in params), parameters=len(params))
    return record


def prepare(accelerator, model, optimizer, *rest):
    """`accelerator.prepare` for every engine. Under DeepSpeed ZeRO-3 each MoE block is first made one
    leaf (`prepare_for_engine`). A model that transformers sharded at load time (`--fsdp_size`) already
    owns its placement and gradient reduction: accelerate prepares everything but wraps no DDP around it."""
    prepare_for_engine(accelerator, model)
    if not getattr(accelerator.unwrap_model(model), "is_distributed_loading_by_transformers", False):
        return accelerator.prepare(model, optimizer, *rest)
    model = accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)
    return (model, *accelerator.prepare(optimizer, *rest))


def prepare_training(accelerator, args, model, processed, collate) -> SimpleNamespace:
    """The recipes' common setup after tokenizing: loaders of `processed["train"]` (shuffled) and
    `processed["validation"]`, the optimizer and schedule, all prepared for the engine (`prepare`)."""
    train_dataloader = DataLoader(processed["train"], shuffle=True, collate_fn=collate,
                                  batch_size=args.per_device_train_batch_size)
    eval_dataloader = DataLoader(processed["validation"], collate_fn=collate,
                                 batch_size=args.per_device_eval_batch_size)
    optimizer = make_optimizer(model, args, accelerator)
    lr_scheduler = schedule(args, accelerator, train_dataloader, optimizer)
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = prepare(
        accelerator, model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)
    return SimpleNamespace(accelerator=accelerator, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                           train_dataloader=train_dataloader, eval_dataloader=eval_dataloader)


def prepare_for_engine(accelerator, model):
    """Before `accelerator.prepare`: under DeepSpeed ZeRO-3 every MoE block is one leaf module, gathered
    whole, so that a rank that routes no token to an expert does not wait for that expert's gather
    forever (DeepSpeed's `set_z3_leaf_modules`)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    from ..modeling.moe import MoEFeedForward

    classes = sorted({type(m) for m in model.modules() if isinstance(m, MoEFeedForward)}, key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
    return classes


def schedule(args, accelerator, train_dataloader, optimizer):
    """Sets args.max_train_steps / num_train_epochs and returns the LR scheduler."""
    from transformers import get_scheduler

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    # The prepared scheduler steps once per process per update (accelerate's convention), hence the product.
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )


def router_loss_parts(outputs, config):
    """The weighted router/gate part of `outputs.loss` (task loss = loss - this)."""
    total = outputs.loss.new_zeros(())
    if getattr(outputs, "aux_loss", None) is not None:
        total = total + config.router_aux_loss_coef * outputs.aux_loss
    if getattr(outputs, "z_loss", None) is not None:
        total = total + config.router_z_loss_coef * outputs.z_loss
    if getattr(outputs, "compute_loss", None) is not None:
        total = total + outputs.compute_loss
    return total


def start_run(accelerator, args, model, name, what):
    """TensorBoard trackers (with the run's scalar settings) and one line saying what is trained."""
    if args.with_tracking:
        accelerator.init_trackers(name, {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    total, trainable = count_parameters(model)
    accelerator.print(f"{what}, {total / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trainable), "
                      f"{args.max_train_steps} steps on {accelerator.num_processes} process(es)")


def train(accelerator, model, optimizer, lr_scheduler, train_dataloader, args, config):
    """The loop of the transformers no-trainer examples: `accumulate`, periodic `save_state`,
    resume at the exact optimizer step (`skip_first_batches`), TensorBoard scalars.

    Dropout is seeded per micro-batch from (seed, batch index, process), so a resumed run draws
    the same masks as an uninterrupted one. Returns a dict of training results."""
    from tqdm.auto import tqdm

    batches_per_epoch = len(train_dataloader)
    completed_steps, starting_epoch, skip = _resume_point(accelerator, args, batches_per_epoch)
    progress = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process, desc="train")
    progress.update(completed_steps)
    tally = _Tally(accelerator)
    for epoch in range(starting_epoch, args.num_train_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        batches = (accelerator.skip_first_batches(train_dataloader, skip) if epoch == starting_epoch and skip
                   else train_dataloader)
        first = skip if epoch == starting_epoch else 0
        for index, batch in enumerate(batches, start=first):
            torch.manual_seed((args.seed * 1_000_003 + epoch * batches_per_epoch + index) * 64
                              + accelerator.process_index)
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    clip_grad_norm(accelerator, model, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            tally.add(outputs, batch, config)
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            if completed_steps % args.logging_steps == 0 or completed_steps == args.max_train_steps:
                logs = tally.log(args, completed_steps, lr_scheduler.get_last_lr()[0], epoch)
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
            if args.checkpointing_steps and completed_steps % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, completed_steps)
            if completed_steps >= args.max_train_steps:
                break
        if completed_steps >= args.max_train_steps:
            break
    progress.close()
    return {**tally.results(), "train_steps": completed_steps, "engine": engine_record(accelerator, model)}


def _resume_point(accelerator, args, batches_per_epoch) -> tuple[int, int, int]:
    """(optimizer steps done, epoch to start in, batches of it to skip): zeros unless
    `--resume_from_checkpoint`, whose state is loaded here."""
    if not args.resume_from_checkpoint:
        return 0, 0, 0
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    accelerator.print(f"Resuming from {args.resume_from_checkpoint}")
    accelerator.load_state(args.resume_from_checkpoint)
    completed_steps = json.loads((Path(args.resume_from_checkpoint) / STATE_FILE).read_text())["completed_steps"]
    skip = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
    return completed_steps, completed_steps // steps_per_epoch, skip


class _Tally:
    """What the loop logs and returns: losses since the last log (loss, task loss, aux loss, z loss),
    the run's mean loss, examples seen and a digest of the batches this process read (ranks of one
    data-parallel run read different batches)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.sums = torch.zeros(4, device=accelerator.device)
        self.loss, self.batches, self.examples = 0.0, 0, 0
        self.read = hashlib.sha256()
        self.history = []

    def add(self, outputs, batch, config):
        loss = outputs.loss.detach()
        router = router_loss_parts(outputs, config).detach()
        aux = outputs.aux_loss.detach() if outputs.aux_loss is not None else router.new_zeros(())
        z = outputs.z_loss.detach() if outputs.z_loss is not None else router.new_zeros(())
        self.sums += torch.stack([loss.float(), (loss - router).float(), aux.float(), z.float()])
        self.loss += loss.item()
        self.batches += 1
        self.examples += batch["input_ids"].shape[0]
        self.read.update(batch["input_ids"].cpu().numpy().tobytes())

    def log(self, args, step, lr, epoch) -> dict:
        """The means since the last log, over processes, into the history (and TensorBoard)."""
        means = self.accelerator.reduce(self.sums, reduction="mean") / max(
            1, args.gradient_accumulation_steps * _since(step, args.logging_steps))
        logs = {"train/loss": means[0].item(), "train/task_loss": means[1].item(), "train/aux_loss": means[2].item(),
                "train/z_loss": means[3].item(), "train/lr": lr, "train/epoch": epoch}
        self.history.append({"step": step, **logs})
        if args.with_tracking:
            self.accelerator.log(logs, step=step)
        self.sums.zero_()
        return logs

    def results(self) -> dict:
        from accelerate.utils import gather_object

        accelerator = self.accelerator
        seen = accelerator.gather(torch.tensor([self.examples], device=accelerator.device)).tolist()
        digest = [self.read.hexdigest()[:16]]
        digests = gather_object(digest) if accelerator.num_processes > 1 else digest
        loss_sum = accelerator.reduce(torch.tensor([self.loss, float(self.batches)], device=accelerator.device),
                                      reduction="sum")
        return {
            "train_loss": (loss_sum[0] / loss_sum[1].clamp(min=1)).item(),  # over every process's batches
            "train_examples_per_process": seen,
            "train_batches_digest_per_process": digests,
            "log_history": self.history,
        }


def clip_grad_norm(accelerator, model, max_norm):
    """`accelerator.clip_grad_norm_`; for a model transformers sharded at load time, whose gradients may
    live on several device meshes (experts on the expert mesh, the rest on the FSDP mesh), one norm per
    mesh, each reduced over its mesh, and their total (as transformers' Trainer does)."""
    if not getattr(accelerator.unwrap_model(model), "is_distributed_loading_by_transformers", False):
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    by_mesh = {}
    for param in model.parameters():
        if param.grad is not None:
            by_mesh.setdefault(param.grad.device_mesh if isinstance(param.grad, DTensor) else None, []).append(param)
    norms = []
    for params in by_mesh.values():
        norm = get_total_norm([p.grad for p in params])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms))
    for params in by_mesh.values():
        clip_grads_with_norm_(params, max_norm, total)
    return total


def _since(step, every):
    return step % every or every


def save_checkpoint(accelerator, args, completed_steps):
    folder = Path(args.output_dir) / CHECKPOINT_DIR / f"step_{completed_steps}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps({"completed_steps": completed_steps}))
    accelerator.wait_for_everyone()
