"""``megaglm-ckpt``: Hugging Face <-> megaglm conversion, offline resharding and inspection.

::

    megaglm-ckpt convert hf-to-megaglm --input HF_DIR --output CKPT_DIR \\
        [--tensor-model-parallel-size N] [--pipeline-model-parallel-size N] \\
        [--virtual-pipeline-model-parallel-size N] [--dtype auto|fp32|bf16|fp16]
    megaglm-ckpt convert megaglm-to-hf --input CKPT_DIR --output HF_DIR --format {glm,chatglm,chatglm_6b} \\
        [--max-shard-size 5GB] [--dtype fp32|bf16|fp16] [--vocab-size N] [--no-tokenizer]
    megaglm-ckpt reshard --input CKPT_DIR --output NEW_DIR --tensor-model-parallel-size N \\
        [--pipeline-model-parallel-size N] [--virtual-pipeline-model-parallel-size N] \\
        [--data-parallel-size N] [--use-distributed-optimizer | --no-distributed-optimizer] [--no-optimizer]
    megaglm-ckpt inspect CKPT_DIR [--json] [--max-tensors N]

The source format of ``hf-to-megaglm`` is read from the input's ``config.json`` (``model_type`` ``glm`` or
``chatglm``). Bad input stops with one line ``megaglm-ckpt: error: ...`` and exit status 2; nothing is left
under ``--output`` then. The logic lives in :mod:`megaglm.convert`; ``ckpt_tools/*.py`` are thin wrappers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

PROG = "megaglm-ckpt"
EXIT_USER_ERROR = 2


def quiet_warnings() -> None:
    """megaglm's quiet start-up for the tools (:func:`megaglm.app.run.configure_output`): megatron-core's
    import-time notices, deprecations and torch's FutureWarnings are not shown."""
    from megaglm.app.output import configure_output

    configure_output(verbose=False, log_format=False)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _layout_args(p: argparse.ArgumentParser, tp_required: bool = False) -> None:
    p.add_argument("--tensor-model-parallel-size", "--tp", type=_positive, default=None if tp_required else 1,
                   required=tp_required, help="TP size of the written checkpoint (default 1)")
    p.add_argument("--pipeline-model-parallel-size", "--pp", type=_positive, default=1,
                   help="PP size of the written checkpoint (default 1)")
    p.add_argument("--virtual-pipeline-model-parallel-size", "--vpp", type=_positive, default=None,
                   help="virtual pipeline stages per PP rank (interleaved schedule; PP > 1)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``megaglm-ckpt`` (subcommands ``convert``, ``reshard``, ``inspect``)."""
    parser = argparse.ArgumentParser(prog=PROG, description="megaglm checkpoint tools: convert, reshard, inspect")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="Hugging Face <-> megaglm")
    csub = conv.add_subparsers(dest="direction", required=True)
    h2m = csub.add_parser("hf-to-megaglm", help="HF directory (glm or chatglm) -> megaglm checkpoint at a TP/PP")
    h2m.add_argument("--input", required=True, help="Hugging Face directory (config.json + weights)")
    h2m.add_argument("--output", required=True, help="new megaglm checkpoint directory (must not exist)")
    _layout_args(h2m)
    h2m.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="dtype of the written weights (default: the input's)")
    m2h = csub.add_parser("megaglm-to-hf", help="megaglm checkpoint -> HF directory (sharded safetensors)")
    m2h.add_argument("--input", required=True, help="megaglm checkpoint (save_dir or iter_NNNNNNN)")
    m2h.add_argument("--output", required=True, help="new Hugging Face directory (must not exist)")
    m2h.add_argument("--format", required=True, choices=["glm", "chatglm", "chatglm_6b"],
                     help="glm: transformers GlmForCausalLM; chatglm: THUDM's names and config (chatglm2/3, glm-4); "
                          "chatglm_6b: THUDM's first-generation chatglm-6b")
    m2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    m2h.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                     help="dtype of the written weights (default: the checkpoint's)")
    m2h.add_argument("--vocab-size", type=_positive, default=None,
                     help="embedding rows to keep (default: the run's tokenizer size for a checkpoint megaglm "
                     "trained, the size recorded at conversion for one converted from HF, else all)")
    m2h.add_argument("--no-tokenizer", action="store_true",
                     help="do not write the run's tokenizer files (tokenizer.json, tokenizer_config.json)")

    rs = sub.add_parser("reshard", help="megaglm checkpoint -> the same at another TP/PP/DP layout")
    rs.add_argument("--input", required=True, help="megaglm checkpoint (save_dir or iter_NNNNNNN)")
    rs.add_argument("--output", required=True, help="new checkpoint directory (must not exist)")
    _layout_args(rs, tp_required=True)
    rs.add_argument("--data-parallel-size", "--dp", type=_positive, default=1,
                    help="DP size (matters for the distributed optimizer's sharding; default 1)")
    opt = rs.add_mutually_exclusive_group()
    opt.add_argument("--use-distributed-optimizer", dest="dist_opt", action="store_const", const=True,
                     default=None, help="shard optimizer state over DP (default: as the source run)")
    opt.add_argument("--no-distributed-optimizer", dest="dist_opt", action="store_const", const=False)
    rs.add_argument("--no-optimizer", action="store_true", help="drop optimizer and scheduler state")

    ins = sub.add_parser("inspect", help="what a checkpoint holds (no tensor data is read)")
    ins.add_argument("checkpoint", help="megaglm checkpoint (save_dir or iter_NNNNNNN) or HF directory")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    ins.add_argument("--max-tensors", type=_positive, default=None, help="list at most this many tensors")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from megaglm.convert.inspect import format_report, inspect_checkpoint

        report = inspect_checkpoint(args.checkpoint)
        print(json.dumps(report, indent=2, default=str) if args.json else format_report(report, args.max_tensors))
        return 0
    quiet_warnings()
    if args.command == "convert" and args.direction == "hf-to-megaglm":
        from megaglm.convert.hf_to_megaglm import hf_to_megaglm

        res = hf_to_megaglm(args.input, args.output, args.tensor_model_parallel_size,
                            args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size, args.dtype)
        mb = res.bytes_in / 2 ** 20
        lay = res.layout
        print(f"{PROG}: wrote {res.iteration_dir} ({res.format} -> megaglm, "
              f"TP={lay['tensor_model_parallel_size']} PP={lay['pipeline_model_parallel_size']}, "
              f"{res.params_dtype}, {mb:,.1f} MiB in "
              f"{res.seconds:.1f} s)")
        print(f"{PROG}: train from it with: megaglm-train {' '.join(res.train_overrides)} "
              f"checkpoint.load_dir={res.output} checkpoint.load_optimizer=false")
        return 0
    if args.command == "convert":
        from megaglm.convert.megaglm_to_hf import megaglm_to_hf

        res = megaglm_to_hf(args.input, args.output, args.format, args.max_shard_size, args.dtype, args.vocab_size,
                            tokenizer=not args.no_tokenizer)
        print(f"{PROG}: wrote {res.output} ({res.format}, {len(res.files)} safetensors file(s), "
              f"vocab {res.vocab_size}, {res.dtype}, {res.bytes_out / 2 ** 20:,.1f} MiB in {res.seconds:.1f} s)")
        return 0
    from megaglm.convert.reshard import reshard

    res = reshard(args.input, args.output, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.virtual_pipeline_model_parallel_size, args.data_parallel_size, args.dist_opt,
                  with_optimizer=not args.no_optimizer)
    lay = res.layout
    print(f"{PROG}: wrote {res.output} (iteration {res.iteration}, TP={lay['tensor_model_parallel_size']} "
          f"PP={lay['pipeline_model_parallel_size']} VPP={lay['virtual_pipeline_model_parallel_size']} "
          f"DP={lay['data_parallel_size']}, optimizer {'kept' if res.with_optimizer else 'not included'}, "
          f"{res.seconds:.1f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``megaglm-ckpt``; returns the exit status (0 ok, 2 bad input or arguments)."""
    args = build_parser().parse_args(argv)
    from megaglm.convert.errors import ConversionError

    try:
        return _run(args)
    except ConversionError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValueError as err:  # CheckpointMismatchError and other checks that name the problem
        if type(err).__name__ in ("CheckpointMismatchError", "MappingError"):
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
