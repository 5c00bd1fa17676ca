"""The ``fusion-dist`` command: one table from subcommand to the function that runs it.

Each entry is imported only when its command runs, so ``fusion-dist prepare`` never pays for
importing torch or deepspeed. Every command function takes its own argv (``list[str]``) and
returns an exit code; ``UserError`` (``ConfigError`` is one) becomes a one-line message and exit 2.
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import sys

from fusion_dist.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "synth": ("data_prep.synth:main", "planted-signal synthetic data in the exact MMSA pickle format"),
    "prepare": ("data_prep.shards:main_prepare", "MMSA pickle or JSONL/CSV manifest -> Arrow shards + manifest"),
    "verify": ("data_prep.shards:main_verify", "check a shard root's manifest and every checksum"),
    "pretrain-av": ("fusion_dist.train.commands:main_pretrain_av", "stage 1: train the AV encoder alone (any launcher)"),
    "train": ("fusion_dist.train.commands:main_train", "stage 2: train DeepMLF / DMPF on the DeepSpeed engine (any launcher)"),
    "evaluate": ("fusion_dist.train.commands:main_evaluate", "metrics of each seed's best checkpoint on valid and test"),
    "export": ("fusion_dist.export:main_export", "trainable weights + config + backbone reference of a run"),
    "predict": ("fusion_dist.export:main_predict", "predictions of an export for a shard split or a JSONL"),
    "make-backbone": ("fusion_dist.models.presets:main_make_backbone", "a local HF LM dir (config, tokenizer, random weights) from a preset"),
    "params": ("fusion_dist.params:main", "trainable / frozen parameter table per MM block, built on the meta device"),
    "plan": ("fusion_dist.plan:main", "per-rank GPU memory per ZeRO stage / offload option, frozen-aware; recommends one"),
    "sync-tracking": ("fusion_dist.tracking:main_sync", "send a run directory's pending MLflow records (idempotent)"),
    "register": ("fusion_dist.registry:main", "log a run's export as an MLflow pyfunc model, register it, set champion/challenger"),
    "compare": ("fusion_dist.compare:main", "table + plot of an MLflow experiment's runs: config differences, mean±std metrics"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: fusion-dist COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'fusion-dist COMMAND --help' for a command's options."]
    return "\n".join(lines)


class _NoCpuGuess(logging.Filter):
    """DeepSpeed's "Setting accelerator to CPU" warning, on a machine without an NVIDIA device: nothing to detect."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


def quiet_start() -> None:
    """Keep the libraries' start-up chatter out of the log (set the variables to see it again): transformers' and
    MLflow's progress bars where stderr is no terminal, MLflow's INFO lines (database creation, "View run at"), and
    DeepSpeed's accelerator guess where there is no GPU to miss."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if not glob.glob("/dev/nvidia[0-9]*"):
        logging.getLogger("DeepSpeed").addFilter(_NoCpuGuess())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher inserts --local_rank=N before the subcommand; ranks are read from the env
    argv = [a for a in argv if not a.startswith("--local_rank=")]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fusion-dist: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    quiet_start()
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except UserError as exc:
        print(f"fusion-dist {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
