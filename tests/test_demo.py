"""The demo: a tiny run end to end, and the random-init baseline being the pretraining run's start."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from mmv.data.phantom import PHANTOM_FINDINGS, PhantomSettings, phantom_manifest, write_phantom_dataset
from mmv.demo import DemoSettings, demo_config, extract_features, initial_encoder, run_demo
from mmv.model.encoder import Encoder
from mmv.packing import pack
from mmv.train.sources import build_pretraining_sources, modality_preprocess
from mmv.train import Trainer

TINY = DemoSettings(num_phantoms=16, steps=2, max_tokens=800, ct_spacing=10.0, xray_spacing=5.0, threads=1)


def test_random_baseline_is_the_pretraining_runs_initialisation(tmp_path):
    settings = PhantomSettings(ct_spacing=(TINY.ct_spacing,) * 3, xray_spacing=TINY.xray_spacing)
    manifest = write_phantom_dataset(tmp_path / "phantoms", 4, 0, settings, progress=False)
    config = demo_config(TINY, manifest, tmp_path / "run")
    baseline = initial_encoder(config).state_dict()
    trainer = Trainer(config, dataset=build_pretraining_sources(config.data))
    started = trainer.student.encoder.state_dict()
    assert baseline.keys() == started.keys()
    assert all(torch.equal(baseline[name], started[name]) for name in baseline)


def test_demo_writes_both_encoders_results_per_modality(tmp_path):
    results = run_demo(tmp_path, TINY, progress=False)
    written = json.loads((tmp_path / "demo_results.json").read_text())
    for modality in ("xray", "ct"):
        assert set(written[modality]) == {"ssl", "random"}
        for encoder in ("ssl", "random"):
            detail = written["detail"][modality][encoder]
            assert set(detail["per_finding"]) == set(detail["per_finding_interval"]) == set(PHANTOM_FINDINGS)
            for low, high in detail["per_finding_interval"].values():
                assert (math.isnan(low) and math.isnan(high)) or 0.0 <= low <= high <= 1.0
            low, high = detail["macro_auroc_interval"]
            macro = detail["macro_auroc"]
            assert math.isnan(macro) or (0.0 <= macro <= 1.0 and 0.0 <= low <= high <= 1.0)
            assert macro == written[modality][encoder] == results[modality][encoder]
        difference = written["difference"][modality]
        assert len(difference["interval"]) == 2 and difference["confidence"] == 0.95
    assert (tmp_path / "demo_auroc.png").stat().st_size > 0
    assert "macro AUROC" in (tmp_path / "demo_results.md").read_text()


def test_overrides_change_the_recipe_and_the_baseline_follows_run_seed(tmp_path):
    manifest = tmp_path / "manifest.csv"
    base = demo_config(TINY, manifest, tmp_path / "run")
    varied = demo_config(
        dataclasses.replace(TINY, overrides=("run.seed=3", "ssl.teacher_temperature=[0.04, 0.05]")), manifest, tmp_path / "run"
    )
    assert varied.run.seed == 3 and tuple(varied.ssl.teacher_temperature) == (0.04, 0.05)
    assert base.run.seed == TINY.seed and base.augment == varied.augment
    assert not torch.equal(initial_encoder(base).state_dict()["cls_token"], initial_encoder(varied).state_dict()["cls_token"])
    with pytest.raises(ValueError, match="section.key=value"):
        demo_config(dataclasses.replace(TINY, overrides=("run.seed",)), manifest, tmp_path / "run")


def test_features_read_each_image_once_for_all_encoders_and_match_encoding_it_alone(tmp_path):
    settings = PhantomSettings(ct_spacing=(TINY.ct_spacing,) * 3, xray_spacing=TINY.xray_spacing)
    manifest = write_phantom_dataset(tmp_path / "phantoms", 3, 0, settings, progress=False)
    config = demo_config(TINY, manifest, tmp_path / "run")
    dataset = phantom_manifest(manifest, transform=modality_preprocess(config.data))
    encoders = {"first": initial_encoder(config), "second": Encoder(config.model.encoder_config())}
    reads = []

    class CountingReads:
        def __len__(self):
            return len(dataset)

        def __getitem__(self, index):
            reads.append(index)
            return dataset[index]

    # A small token budget packs several forward passes, each of several images of both kinds.
    features, indices = extract_features(encoders, CountingReads(), max_tokens=200, progress=False)
    assert reads == indices == list(range(len(dataset)))
    with torch.no_grad():
        for name, encoder in encoders.items():
            assert features[name].shape == (len(dataset), 2 * encoder.config.embed_dim)
            for index in indices:
                out = encoder(pack([encoder.tokenizer(dataset[index].image)]))
                alone = torch.cat((out.cls, out.pooled), dim=1)[0].numpy()
                np.testing.assert_allclose(features[name][index], alone, rtol=1e-4, atol=1e-4)
    assert not np.allclose(features["first"], features["second"])
    coarse = Encoder(dataclasses.replace(config.model.encoder_config(), patch_size=(8, 8, 8)))
    with pytest.raises(ValueError, match="patch size"):
        extract_features({"fine": encoders["first"], "coarse": coarse}, dataset, progress=False)
