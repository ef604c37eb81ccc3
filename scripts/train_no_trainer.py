"""Train a paper model on the embedded digits data with your own Accelerate loop and `hf_zsharp.accelerate_step`.

    python scripts/train_no_trainer.py --model resnet20 --max_steps 200
    torchrun --nproc_per_node 2 scripts/train_no_trainer.py --gradient_accumulation_steps 2 --mixed_precision bf16

The loop is an ordinary Accelerate loop: `accelerate_step(...)` replaces `accelerator.backward(loss)`. Under
torchrun it is DDP: over NCCL on GPUs, over gloo on the CPU (the default without a CUDA GPU; see --cpu).
"""

import argparse
import json

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from hf_zsharp.augment import BatchAugment, augment_inputs
from hf_zsharp.catalog import DIGITS
from hf_zsharp.data import LABELS, PIXELS, load_image_dataset, normalization_stats
from hf_zsharp.image_data import paper_image_data
from hf_zsharp.models import PAPER_MODELS, build_model
from hf_zsharp.optim import METHODS, create_sam_optimizer
from hf_zsharp.two_pass import accelerate_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet20", choices=PAPER_MODELS)
    parser.add_argument("--sam", default="zsharp", choices=sorted(METHODS), help="sharpness-aware method")
    parser.add_argument("--rho", type=float, default=None, help="ascent radius (default: the method's)")
    parser.add_argument("--sam_interval", type=int, default=1, help="two-pass step every k optimizer steps")
    parser.add_argument("--sync_ascent", action="store_true", help="DDP: all-reduce the ascent gradient")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=5e-5)
    parser.add_argument("--batch_size", type=int, default=64, help="per process and micro-batch")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every", type=int, default=20, help="optimizer steps between log lines")
    parser.add_argument(
        "--cpu",
        action=argparse.BooleanOptionalAction,
        default=not torch.cuda.is_available(),
        help="train on the CPU, under torchrun with DDP over gloo (default: when no CUDA GPU is found)",
    )
    parser.add_argument(
        "--no_augmentation",
        action="store_true",
        help="train without the random crop and flip (then, with --sync_ascent, N processes under torchrun give "
        "the weights of 1 process with --gradient_accumulation_steps N)",
    )
    parser.add_argument("--output_dir", default=None, help="save the trained model here (default: not saved)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "sam_interval", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def digits_loaders(batch_size: int, augment: bool = True) -> tuple[DataLoader, DataLoader, BatchAugment]:
    """Shuffled training batches and test batches of the decoded digits (uint8), and the batch augmentation to
    run inside the model: the paper's random crop and flip if `augment`, then normalisation."""
    dataset = load_image_dataset(DIGITS)
    mean, std = normalization_stats(DIGITS, dataset["train"])
    data = paper_image_data(dataset, mean, std)
    train = DataLoader(
        data.train, batch_size=batch_size, shuffle=True, collate_fn=data.collator, drop_last=True
    )
    test = DataLoader(data.eval, batch_size=256, collate_fn=data.collator)
    return train, test, data.augment if augment else BatchAugment(mean, std, crop=None)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and evaluate; prints and returns the steps, test accuracy, process count and a replica check."""
    args = parse_args(argv)
    # Accelerate runs DDP on the CPU only when told `cpu=True`; otherwise each process would train alone.
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # One shuffled order whatever the number of processes: 2 processes see the batches 1 process sees.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    train_loader, test_loader, augment = digits_loaders(args.batch_size, augment=not args.no_augmentation)
    model = build_model(args.model, num_labels=10)
    # Each batch is cropped, flipped and normalised on the device, inside the forward: both passes alike.
    augment_inputs(model, augment)
    sam_kwargs = {} if args.rho is None else {"rho": args.rho}
    optimizer = create_sam_optimizer(
        args.sam,
        model.named_parameters(),
        torch.optim.AdamW,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        **sam_kwargs,
    )
    # Accelerate's prepared scheduler steps once per process at each optimizer step.
    n = accelerator.num_processes
    scheduler = get_scheduler("linear", optimizer, args.warmup_steps * n, args.max_steps * n)
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler
    )

    step, losses = 0, []
    model.train()
    while step < args.max_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = accelerate_step(
                    accelerator,
                    model,
                    optimizer,
                    batch,
                    sync_ascent=args.sync_ascent,
                    interval=args.sam_interval,
                )
                losses.append(accelerator.reduce(loss, reduction="mean").item())  # over all processes
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                if step % args.log_every == 0 or step == args.max_steps:
                    accelerator.print(json.dumps({"step": step, "loss": round(sum(losses) / len(losses), 4)}))
                    losses = []
                if step == args.max_steps:
                    break

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in test_loader:
            predictions = model(**{PIXELS: batch[PIXELS]}).logits.argmax(dim=-1)
            predictions, labels = accelerator.gather_for_metrics((predictions, batch[LABELS]))
            correct += (predictions == labels).sum().item()
            total += labels.numel()
    # DDP keeps the replicas identical: check it on a checksum of every process's weights.
    checksum = sum(p.detach().float().sum() for p in model.parameters()).reshape(1)
    replicas_in_sync = bool((accelerator.gather(checksum) == checksum).all())
    result = {
        "steps": step,
        "eval_accuracy": correct / total,
        "num_processes": accelerator.num_processes,
        "replicas_in_sync": replicas_in_sync,
    }
    accelerator.print(json.dumps(result))
    if args.output_dir is not None:
        accelerator.wait_for_everyone()
        accelerator.unwrap_model(model).save_pretrained(
            args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
        )
    accelerator.end_training()  # ends the process group (gloo may abort at exit without it)
    return result


if __name__ == "__main__":
    main()
