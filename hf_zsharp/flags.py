"""The option names of `hf-zsharp-train`, to refuse an unknown flag in a fraction of a second: before torch and
transformers are imported (10-20 s on a loaded machine). Imports nothing of the package."""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Iterable
from functools import cache
from importlib import metadata
from pathlib import Path

# The option names of `hf-zsharp-train` (`TrainArgumentParser`: each is --name, and --na-me where it holds "_"),
# as the transformers release below defines them, but for the optimizers' own options (`method_option_fields`);
# tests/test_cli_flags.py checks them against the parser and prints the new text when a release changes them.
# With another release installed the parser alone checks.
TRAIN_OPTIONS_TRANSFORMERS = "5.25.0"
TRAIN_OPTION_NAMES = frozenset(
    """
    accelerator_config activation_checkpointing activation_checkpointing_kwargs adam_beta1 adam_beta2
    adam_epsilon auto_find_batch_size average_tokens_across_devices batch_eval_metrics bf16
    bf16_full_eval cache_dir config data_seed dataloader_drop_last dataloader_in_order
    dataloader_multiprocessing_context dataloader_num_workers dataloader_persistent_workers
    dataloader_pin_memory dataloader_prefetch_factor dataset_config_name dataset_name ddp_backend
    ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout
    debug deepspeed disable_tqdm do_eval do_predict do_train enable_jit_checkpoint
    eval_accumulation_steps eval_delay eval_do_concat_batches eval_on_start eval_split eval_steps
    eval_strategy eval_use_gather_object fp16 fp16_full_eval fsdp fsdp_config full_determinism
    gradient_accumulation_steps gradient_checkpointing gradient_checkpointing_kwargs greater_is_better
    help hub_always_push hub_model_id hub_private_repo hub_revision hub_strategy hub_token
    ignore_data_skip image_column_name image_size include_for_metrics include_num_input_tokens_seen
    label_column_name label_names label_smoothing_factor learning_rate length_column_name
    liger_kernel_config load_best_model_at_end local_rank log_level log_level_replica log_on_each_node
    logging_first_step logging_nan_inf_filter logging_steps logging_strategy lr_scheduler_kwargs
    lr_scheduler_type max_eval_samples max_grad_norm max_steps max_train_samples metric_for_best_model
    model_name_or_path model_revision neftune_noise_alpha no_average_tokens_across_devices
    no_dataloader_in_order no_dataloader_pin_memory no_eval_do_concat_batches no_log_on_each_node
    no_logging_nan_inf_filter no_remove_unused_columns no_skip_memory_metrics num_train_epochs optim
    optim_args optim_target_modules output_dir overwrite_output_dir parallelism_config
    per_device_eval_batch_size per_device_train_batch_size prediction_loss_only project push_to_hub
    remove_unused_columns report_to restore_callback_states_from_checkpoint resume_from_checkpoint
    run_name sam sam_interval sam_rho sam_sync_ascent save_on_each_node save_only_model save_steps
    save_strategy save_total_limit seed skip_memory_metrics tf32 torch_compile torch_compile_backend
    torch_compile_mode torch_empty_cache_steps trackio_bucket_id trackio_space_id
    trackio_static_space_id train_sampling_strategy train_split train_val_split use_cache use_cpu
    use_liger_kernel warmup_steps weight_decay
    """.split()  # noqa: SIM905 (generated text, wrapped as the test prints it)
)
_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")  # a value to argparse, not a flag


@cache
def method_option_fields() -> frozenset[str]:
    """The argument fields the optimizers declare (`Option(name, field, ...)` in hf_zsharp/optim/), read from their
    source: a new option needs no entry here, and torch need not load to know its flag."""
    fields = set()
    for path in sorted((Path(__file__).parent / "optim").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Option":
                field = (
                    node.args[1]
                    if len(node.args) > 1
                    else next(k.value for k in node.keywords if k.arg == "field")
                )
                fields.add(ast.literal_eval(field))
    return frozenset(fields)


def refuse_unknown_flags(argv: list[str]) -> None:
    """Refuse a flag that `hf-zsharp-train` does not have, with the closest option, before transformers is
    imported; the same message as the parser's (`TrainArgumentParser`). Only with the transformers release that
    TRAIN_OPTION_NAMES was made for: with another, the parser alone knows the options."""
    try:
        if metadata.version("transformers") != TRAIN_OPTIONS_TRANSFORMERS:
            return
    except metadata.PackageNotFoundError:
        return
    options = {"-h"} | {
        f"--{spelling}"
        for name in TRAIN_OPTION_NAMES | method_option_fields()
        for spelling in (name, name.replace("_", "-"))
    }
    unknown: list[str] = []
    after_unknown_flag = False  # whether the arguments since the last flag are an unknown flag's values
    for argument in argv:
        if argument == "--":
            break
        if argument.startswith("-") and not _NEGATIVE_NUMBER.fullmatch(argument):
            after_unknown_flag = argument.startswith("--") and argument.split("=", 1)[0] not in options
            if after_unknown_flag:
                unknown.append(argument)
        elif after_unknown_flag:
            unknown.append(argument)  # left unparsed by argparse, as the flag is unknown
    if unknown:
        raise ValueError(unrecognized_arguments_message(unknown, options))


def unrecognized_arguments_message(unknown: list[str], options: Iterable[str]) -> str:
    """Name the unknown arguments (an unknown flag with the values that follow it), with the closest option of
    each unknown flag: the message of `refuse_unknown_flags` and of the parser (`TrainArgumentParser`) alike."""
    options = list(options)
    groups: list[list[str]] = []
    for argument in unknown:
        if argument[:1] == "-" or not groups or groups[-1][0][:2] != "--":
            groups.append([argument])
        else:
            groups[-1].append(argument)
    named = []
    for group in groups:
        close = (
            difflib.get_close_matches(group[0].split("=", 1)[0], options, n=1) if group[0][:2] == "--" else []
        )
        named.append(" ".join(group) + (f" (did you mean {close[0]}?)" if close else ""))
    return f"unrecognized arguments: {', '.join(named)}; `hf-zsharp-train --help` lists the options."
