"""The ``mmv`` command.

``mmv pretrain --config run.toml [--set section.key=value ...] [--resume]``
    self-supervised pretraining (see :mod:`mmv.train` and :mod:`mmv.train.config`); under ``torchrun``
    it trains with DDP (``torchrun --nproc_per_node 2 -m mmv.cli pretrain ...``).
``mmv phantom --out DIR [--count N] [--seed S] [--workers N]``
    writes a phantom data set (:mod:`mmv.data.phantom`).
``mmv demo [--out DIR] [--set section.key=value ...]``
    phantoms -> pretraining -> linear probes, pretrained against random initialisation (:mod:`mmv.demo`).
``mmv embed CHECKPOINT [CHECKPOINT ...] --dataset KIND --data PATH --out DIR [--name NAME ...]``
    frozen features of a data set as a feature table (:mod:`mmv.eval.embed`); with several checkpoints,
    one table per encoder in ``DIR/NAME``, each image read once for all of them.
``mmv probe FEATURES --protocol NAME --out DIR [--modality TAG]`` and ``mmv analyze FEATURES --out DIR``
    evaluation of feature tables (:mod:`mmv.eval.commands`).

Every command's arguments are defined here, and only here; the library functions take plain Python
values. A command's arguments are defined when that command is parsed, and the library is imported by
the command that runs, so ``mmv --help`` imports no torch. Every option has a help text and ``--help``
shows each default. Errors in the input (a missing file, an
invalid config value, an unreadable checkpoint, image or feature table) end the command with a one-line
message on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help where it has a default that its help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # Flags (default False), unset options (None) and empty lists have no default worth stating.
        default = action.default
        unstated = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if not action.option_strings or "default" in text or unstated:
            return text
        return f"{text} (default: %(default)s)"


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser whose arguments ``define`` adds when the subcommand is first parsed or its
    help printed: a command whose options show a library default (the demo's settings, the modality
    tags) imports that library only when it is the command asked for."""

    def __init__(self, *args, define: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._define = define

    def _defined(self) -> None:
        if self._define is not None:
            define, self._define = self._define, None
            define(self)

    def parse_known_args(self, args=None, namespace=None):
        self._defined()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._defined()
        return super().format_help()

    def format_usage(self) -> str:
        self._defined()
        return super().format_usage()


def _pretrain_arguments(pretrain: argparse.ArgumentParser) -> None:
    pretrain.add_argument(
        "--config",
        help="TOML run config (sections model, data, augment, ssl, optim, run; see configs/); required to train, "
        "its [data] sources list the images",
    )
    pretrain.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value (TOML syntax), e.g. --set optim.lr=1e-3; repeatable",
    )
    pretrain.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of run.out_dir")
    pretrain.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def _phantom_arguments(phantom: argparse.ArgumentParser) -> None:
    phantom.add_argument("--out", required=True, help="output directory")
    phantom.add_argument("--count", type=_positive_int, default=200, help="phantoms (each one CT and one radiograph)")
    phantom.add_argument("--seed", type=int, default=0, help="seed of the phantoms")
    phantom.add_argument("--ct-spacing", type=_positive_float, default=4.0, help="CT voxel size in mm")
    phantom.add_argument("--xray-spacing", type=_positive_float, default=2.0, help="radiograph pixel size in mm")
    phantom.add_argument(
        "--workers", type=_positive_int,
        help="processes writing phantoms in parallel; the data set is the same for any number (default: one per core)",
    )


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    from mmv.demo import DemoSettings

    defaults = DemoSettings()
    demo.add_argument("--out", default="mmv-demo", help="output directory (default: mmv-demo)")
    demo.add_argument("--phantoms", type=_positive_int, help=f"number of phantoms (default: {defaults.num_phantoms})")
    demo.add_argument("--steps", type=_positive_int, help=f"pretraining steps (default: {defaults.steps})")
    demo.add_argument("--seed", type=int, help=f"seed of the phantoms, initialisation and probes (default: {defaults.seed})")
    demo.add_argument("--threads", type=_positive_int, help=f"torch threads (default: {defaults.threads})")
    demo.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one value of the pretraining config (TOML syntax), e.g. --set run.seed=1; repeatable",
    )


def _embed_arguments(embed: argparse.ArgumentParser) -> None:
    from mmv.data.dataset_spec import DATASET_KINDS

    embed.add_argument(
        "checkpoints", nargs="+", metavar="CHECKPOINT",
        help="encoder directory, training checkpoint (.pt) or pretraining run directory; several are embedded "
        "together, each image read once for all of them (see --name)",
    )
    embed.add_argument("--dataset", required=True, choices=DATASET_KINDS, help="kind of data set")
    embed.add_argument("--data", required=True, help="the manifest CSV, or the data set's root directory")
    embed.add_argument(
        "--out", required=True,
        help="feature table directory to write; with several checkpoints, the directory of their tables",
    )
    embed.add_argument(
        "--name", dest="names", action="append", metavar="NAME",
        help="with several checkpoints: the table of each, in --out/NAME, one --name per checkpoint in order",
    )
    embed.add_argument(
        "--split", dest="splits", action="append", metavar="SPLIT",
        help="embed only this split (repeatable); default all (mimic: train, validate, test; chexpert and "
        "ctrate: train, valid; manifest: values of its split column)",
    )
    embed.add_argument("--fixed", action="store_true", help="ctrate: read the header-fixed volumes")
    embed.add_argument("--id-column", help="manifest: the id column (default 'id' when present, else the path)")
    embed.add_argument(
        "--label-columns", nargs="+", metavar="NAME",
        help="manifest: the label columns (default: all but path, modality, id, split and group)",
    )
    embed.add_argument("--max-tokens", type=int, default=16384, help="patch tokens per batch (default: 16384)")
    embed.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    embed.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    embed.add_argument("--bf16", action="store_true", help="encode under bfloat16 autocast")
    embed.add_argument(
        "--ct-spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
        help="CT voxel size in mm (default: the encoder's)",
    )
    embed.add_argument(
        "--ct-window", type=float, nargs=2, metavar=("LOW", "HIGH"), help="CT window in HU (default: the encoder's)"
    )
    xray = embed.add_mutually_exclusive_group()
    xray.add_argument("--xray-spacing", type=float, help="X-ray pixel size in mm (default: the encoder's)")
    xray.add_argument("--xray-short-side", type=int, help="X-ray short side in pixels (default: the encoder's)")
    embed.add_argument("--cache-dir", help="preprocessing cache directory")
    embed.add_argument(
        "--on-error", choices=("raise", "skip"), default="raise",
        help="what to do with unreadable images (default: raise)",
    )
    embed.add_argument("--no-resume", action="store_true", help="start over instead of resuming --out")
    embed.add_argument("--no-progress", action="store_true", help="no progress bars")


def _probe_arguments(probe: argparse.ArgumentParser) -> None:
    from mmv.data.datasets import CT_MODALITY, XRAY_MODALITY
    from mmv.eval.protocols import PROTOCOLS

    probe.add_argument("features", help="feature table directory")
    probe.add_argument("--protocol", required=True, help=", ".join(PROTOCOLS))
    probe.add_argument("--out", required=True, help="output directory")
    probe.add_argument("--labels-root", help="the data set's label directory (not needed by 'manifest')")
    probe.add_argument(
        "--array", dest="arrays", nargs="+", default=["cls"], metavar="NAME",
        help="feature array to probe; several are probed side by side, e.g. cls patch_mean (default: cls)",
    )
    probe.add_argument(
        "--modality", metavar="TAG",
        help=f"probe only the rows of this modality tag of a mixed table, e.g. {CT_MODALITY} or {XRAY_MODALITY} "
        "(default: all rows)",
    )
    probe.add_argument("--seed", type=int, default=0, help="seed of the carved validation split and the bootstrap")


def _analyze_arguments(analyze: argparse.ArgumentParser) -> None:
    from mmv.data.datasets import CT_MODALITY, XRAY_MODALITY

    analyze.add_argument("features", help="feature table directory")
    analyze.add_argument("--out", required=True, help="output directory")
    analyze.add_argument("--second-features", help="a second feature table for the second modality")
    analyze.add_argument(
        "--modalities", nargs=2, default=(XRAY_MODALITY, CT_MODALITY), metavar=("A", "B"),
        help=f"the two modality tags to compare (default: {XRAY_MODALITY} {CT_MODALITY})",
    )
    analyze.add_argument("--array", default="cls", help="feature array to analyse")
    analyze.add_argument("--seed", type=int, default=0, help="seed of the row subsets, splits and bootstrap")


def _pretrain(args: argparse.Namespace) -> int:
    from mmv.train.config import load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if args.config is None and not config.data.sources:
        raise ValueError(
            "--config is required: a TOML run config whose [data] section lists the image sources "
            "(e.g. configs/phantom_vit_tiny.toml after mmv phantom); --print-config shows the defaults"
        )
    from mmv.train import pretrain

    encoder_dir = pretrain(config, resume=args.resume)
    print(f"encoder written to {encoder_dir}")
    return 0


def _phantom(args: argparse.Namespace) -> int:
    from mmv.data.phantom import PhantomSettings, write_phantom_dataset

    settings = PhantomSettings(ct_spacing=(args.ct_spacing,) * 3, xray_spacing=args.xray_spacing)
    manifest = write_phantom_dataset(args.out, args.count, args.seed, settings, workers=args.workers)
    print(f"manifest written to {manifest}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mmv.numerics import pin_cpu_numerics

    # Before the first tensor operation, so that the figures follow no processor (mmv.numerics).
    try:
        pin_cpu_numerics()
    except RuntimeError as error:  # main() called from a process that has computed already
        warnings.warn(f"{error}; the demo runs unpinned, its figures may differ on another processor", RuntimeWarning)
    from mmv.demo import DemoSettings, format_results, run_demo

    chosen = {"num_phantoms": args.phantoms, "steps": args.steps, "seed": args.seed, "threads": args.threads}
    settings = DemoSettings(**{k: v for k, v in chosen.items() if v is not None}, overrides=tuple(args.overrides))
    results = run_demo(args.out, settings)
    print("Linear-probe AUROC on the test phantoms, pretrained encoder vs the same encoder at random initialisation:")
    print(format_results(results))
    print(f"results in {args.out}/demo_results.json, plot in {args.out}/demo_auroc.png")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from mmv.data.dataset_spec import DatasetSpec
    from mmv.eval.embed import RUN_FILE, run_embed, run_embed_encoders

    if len(args.checkpoints) > 1 and len(args.names or ()) != len(args.checkpoints):
        raise ValueError(
            f"--name must be given once per checkpoint ({len(args.checkpoints)} checkpoints, "
            f"{len(args.names or ())} names): each encoder's table is --out/NAME"
        )
    if len(args.checkpoints) == 1 and args.names:
        raise ValueError("--name applies to several checkpoints; with one, --out is its table")
    spec = DatasetSpec(
        kind=args.dataset,
        path=args.data,
        splits=None if not args.splits else tuple(args.splits),
        fixed=args.fixed,
        id_column=args.id_column,
        label_columns=None if args.label_columns is None else tuple(args.label_columns),
    )
    options = {
        "max_tokens": args.max_tokens,
        "num_workers": args.num_workers,
        "device": args.device,
        "bf16": args.bf16,
        "ct_spacing": args.ct_spacing,
        "ct_window": args.ct_window,
        "xray_spacing": args.xray_spacing,
        "xray_short_side": args.xray_short_side,
        "cache_dir": args.cache_dir,
        "on_error": args.on_error,
        "resume": not args.no_resume,
        "progress": not args.no_progress,
    }
    if args.names:
        if len(set(args.names)) != len(args.names):
            raise ValueError(f"--name must name each checkpoint's table differently, got {args.names}")
        runs = run_embed_encoders(dict(zip(args.names, args.checkpoints)), spec, args.out, **options)
    else:
        runs = {"": run_embed(args.checkpoints[0], spec, args.out, **options)}
    for name, run in runs.items():
        which = f"{name}: " if name else ""
        if run.encoded:
            print(f"{which}{run.encoded} images encoded in {run.seconds:.1f} s ({run.images_per_s:.2f} images/s)")
        else:
            print(f"{which}the feature table was already complete")
        if run.skipped_ids:
            print(f"{which}{len(run.skipped_ids)} unreadable images left out (listed in {run.directory / RUN_FILE})")
        print(f"{which}{run.num_rows} rows of features in {run.directory}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from mmv.eval.commands import run_probe

    run = run_probe(
        args.features, args.protocol, args.out, labels_root=args.labels_root,
        array=args.arrays[0] if len(args.arrays) == 1 else tuple(args.arrays), modality=args.modality, seed=args.seed,
    )
    print(f"macro AUROC {run.evaluation.macro_auroc:.4f}; results in {run.outputs['json']}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from mmv.eval.commands import run_analysis

    run = run_analysis(
        args.features, args.out, modalities=tuple(args.modalities), second_features_dir=args.second_features,
        array=args.array, seed=args.seed,
    )
    print(f"results in {run.outputs['json']}")
    return 0


# Each command: its one-line summary, the function defining its arguments and the one running it.
_COMMANDS = {
    "pretrain": ("self-supervised pretraining from a TOML run config", _pretrain_arguments, _pretrain),
    "phantom": ("write a synthetic chest CT / radiograph data set", _phantom_arguments, _phantom),
    "demo": ("phantoms -> pretraining -> linear probes, pretrained vs random init", _demo_arguments, _demo),
    "embed": ("frozen encoder features of a data set", _embed_arguments, _embed),
    "probe": ("linear probe on a feature table under an evaluation protocol", _probe_arguments, _probe),
    "analyze": ("how two modalities share the feature space", _analyze_arguments, _analyze),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mmv`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="mmv", description="One ViT for chest X-rays and CT: pretraining and evaluation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name, (summary, define, _) in _COMMANDS.items():
        commands.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter, define=define)
    return parser


def _input_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises, reported in one line; anything else is a defect and keeps its traceback.

    CheckpointError and TableError are ValueErrors, FileNotFoundError an OSError. Imported when a command
    has failed, so that the parser stays light."""
    from mmv.data.io import ImageReadError
    from mmv.eval.features import FeatureTableError

    return (ValueError, TypeError, OSError, FeatureTableError, ImageReadError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mmv`` command; returns the exit status (errors in the input exit with status 2)."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command][2](args)
    except Exception as error:
        if not isinstance(error, _input_errors()):
            raise
        print(f"mmv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
