"""A few steps of the demo's pretraining, then features and probes; prints SHA-256 digests of the results.

Run as a script in a fresh process (the numerics are chosen at the first tensor operation):

    python tests/numerics_fingerprint.py PHANTOM_DIR OUT_DIR [--pin] [--bf16] [--steps N] [--threads N]

PHANTOM_DIR holds a phantom data set written with the spacings below. Prints one JSON line:
``weights`` (the teacher encoder after training), ``features`` (both encoders' features of every image)
and ``probe`` (a linear probe fitted on them), plus ``capability``, PyTorch's kernel path.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

SPACINGS = {"ct_spacing": 10.0, "xray_spacing": 5.0}


def _digest(arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(array.tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phantoms")
    parser.add_argument("out")
    parser.add_argument("--pin", action="store_true", help="pin_cpu_numerics() first")
    parser.add_argument("--bf16", action="store_true", help="pretrain under bfloat16 autocast where the CPU has it")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=800)
    args = parser.parse_args()
    if args.pin:
        from mmv.numerics import pin_cpu_numerics

        pin_cpu_numerics()

    import numpy as np
    import torch

    from mmv.data.dataset_spec import DatasetSpec
    from mmv.data.phantom import MANIFEST_NAME, PHANTOM_FINDINGS
    from mmv.demo import DemoSettings, demo_config, initial_encoder
    from mmv.eval.embed import ARRAY_NAMES, run_embed_encoders
    from mmv.eval.features import read_feature_table
    from mmv.eval.probe import fit_linear_probe
    from mmv.train import Trainer
    from mmv.train.sources import build_pretraining_sources

    manifest = Path(args.phantoms) / MANIFEST_NAME
    settings = DemoSettings(
        num_phantoms=0, steps=args.steps, max_tokens=args.max_tokens, threads=args.threads,
        overrides=(f"run.bf16={'true' if args.bf16 else 'false'}", "run.progress=false"), **SPACINGS,
    )
    config = demo_config(settings, manifest, Path(args.out))
    random_encoder = initial_encoder(config)
    trainer = Trainer(config, dataset=build_pretraining_sources(config.data))
    trainer.train()
    teacher = trainer.teacher.module.encoder
    state = teacher.state_dict()
    weights = _digest(state[name].float().numpy() for name in sorted(state))

    # The demo's path: one embed run for both encoders, then a probe on the tables.
    embedded = run_embed_encoders(
        {"ssl": trainer.out_dir, "random": random_encoder}, DatasetSpec("manifest", manifest, id_column="id"),
        Path(args.out) / "features", device="cpu", resume=False, progress=False,
    )
    tables = {name: read_feature_table(run.directory, ARRAY_NAMES) for name, run in embedded.items()}
    features = {name: np.asarray(table.features) for name, table in tables.items()}
    labels = np.asarray(tables["ssl"].index.labels, dtype=np.float64)
    half = len(labels) // 2
    probe = fit_linear_probe(
        features["ssl"][:half], labels[:half], features["ssl"][half:], labels[half:],
        label_names=PHANTOM_FINDINGS, progress=False,
    )
    print(json.dumps({
        "capability": torch.backends.cpu.get_cpu_capability(),
        "weights": weights,
        "features": _digest(features[name] for name in sorted(features)),
        "probe": _digest((probe.weight, probe.bias)),
    }))


if __name__ == "__main__":
    sys.exit(main())
