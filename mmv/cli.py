"""The ``mmv`` command.

``mmv pretrain --config run.toml [--set section.key=value ...] [--resume]``
    self-supervised pretraining (see :mod:`mmv.train` and :mod:`mmv.train_config`); under ``torchrun``
    it trains with DDP (``torchrun --nproc_per_node 2 -m mmv.cli pretrain ...``).
``mmv phantom --out DIR [--count N] [--seed S] [--workers N]``
    writes a phantom data set (:mod:`mmv.data.phantom`).
``mmv demo [--out DIR] [--set section.key=value ...]``
    phantoms -> pretraining -> linear probes, pretrained against random initialisation (:mod:`mmv.demo`).
``mmv embed CHECKPOINT --dataset KIND --data PATH --out DIR``
    frozen features of a data set as a feature table (:mod:`mmv.eval.embed`).
``mmv probe FEATURES --protocol NAME --out DIR [--modality TAG]`` and ``mmv analyze FEATURES --out DIR``
    evaluation of feature tables (:mod:`mmv.eval.commands`).

Every option has a help text and ``--help`` shows each default. Errors in the input (a missing file, an
invalid config value, an unreadable checkpoint, image or feature table) end the command with a one-line
message on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

from mmv.data.datasets import CT_MODALITY, XRAY_MODALITY
from mmv.data.io import ImageReadError
from mmv.eval.embed import add_embed_arguments
from mmv.eval.features import FeatureTableError

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mmv`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="mmv", description="One ViT for chest X-rays and CT: pretraining and evaluation.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    pretrain = add_command("pretrain", "self-supervised pretraining from a TOML run config")
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

    phantom = add_command("phantom", "write a synthetic chest CT / radiograph data set")
    phantom.add_argument("--out", required=True, help="output directory")
    phantom.add_argument("--count", type=_positive_int, default=200, help="phantoms (each one CT and one radiograph)")
    phantom.add_argument("--seed", type=int, default=0, help="seed of the phantoms")
    phantom.add_argument("--ct-spacing", type=_positive_float, default=4.0, help="CT voxel size in mm")
    phantom.add_argument("--xray-spacing", type=_positive_float, default=2.0, help="radiograph pixel size in mm")
    phantom.add_argument(
        "--workers", type=_positive_int,
        help="processes writing phantoms in parallel; the data set is the same for any number (default: one per core)",
    )

    demo = add_command("demo", "phantoms -> pretraining -> linear probes, pretrained vs random init")
    demo.add_argument("--out", default="mmv-demo", help="output directory (default: mmv-demo)")
    from mmv.demo import DemoSettings

    defaults = DemoSettings()
    demo.add_argument("--phantoms", type=_positive_int, help=f"number of phantoms (default: {defaults.num_phantoms})")
    demo.add_argument("--steps", type=_positive_int, help=f"pretraining steps (default: {defaults.steps})")
    demo.add_argument("--seed", type=int, help=f"seed of the phantoms, initialisation and probes (default: {defaults.seed})")
    demo.add_argument("--threads", type=_positive_int, help=f"torch threads (default: {defaults.threads})")
    demo.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one value of the pretraining config (TOML syntax), e.g. --set run.seed=1; repeatable",
    )

    add_embed_arguments(add_command("embed", "frozen encoder features of a data set"))

    probe = add_command("probe", "linear probe on a feature table under an evaluation protocol")
    probe.add_argument("features", help="feature table directory")
    probe.add_argument("--protocol", required=True, help="chexpert5, mimic14, ctrate18 or manifest")
    probe.add_argument("--out", required=True, help="output directory")
    probe.add_argument("--labels-root", help="the data set's label directory (not needed by 'manifest')")
    probe.add_argument("--array", default="cls", help="feature array to probe (default: cls)")
    probe.add_argument(
        "--modality", metavar="TAG",
        help=f"probe only the rows of this modality tag of a mixed table, e.g. {CT_MODALITY} or {XRAY_MODALITY} "
        "(default: all rows)",
    )
    probe.add_argument("--seed", type=int, default=0, help="seed of the carved validation split and the bootstrap")

    analyze = add_command("analyze", "how two modalities share the feature space")
    analyze.add_argument("features", help="feature table directory")
    analyze.add_argument("--out", required=True, help="output directory")
    analyze.add_argument("--second-features", help="a second feature table for the second modality")
    analyze.add_argument(
        "--modalities", nargs=2, default=(XRAY_MODALITY, CT_MODALITY), metavar=("A", "B"),
        help=f"the two modality tags to compare (default: {XRAY_MODALITY} {CT_MODALITY})",
    )
    analyze.add_argument("--array", default="cls", help="feature array to analyse")
    analyze.add_argument("--seed", type=int, default=0, help="seed of the row subsets, splits and bootstrap")
    return parser


def _embed(args: argparse.Namespace) -> int:
    from mmv.eval.embed import main_embed

    return main_embed(args)


def _pretrain(args: argparse.Namespace) -> int:
    from mmv.train_config import load_config

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


def _probe(args: argparse.Namespace) -> int:
    from mmv.eval.commands import run_probe

    run = run_probe(
        args.features, args.protocol, args.out, labels_root=args.labels_root, array=args.array,
        modality=args.modality, seed=args.seed,
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


# What bad input raises (CheckpointError and TableError are ValueErrors, FileNotFoundError an OSError):
# reported in one line; anything else is a defect and keeps its traceback.
_INPUT_ERRORS = (ValueError, TypeError, OSError, FeatureTableError, ImageReadError)

_COMMANDS = {
    "pretrain": _pretrain, "phantom": _phantom, "demo": _demo, "embed": _embed, "probe": _probe, "analyze": _analyze,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mmv`` command; returns the exit status (errors in the input exit with status 2)."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except _INPUT_ERRORS as error:
        print(f"mmv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
