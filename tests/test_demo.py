"""The demo: a tiny run end to end, and the random-init baseline being the pretraining run's start."""

import dataclasses
import json
import math

import pytest
import torch

from mmv.data.datasets import CT_MODALITY, XRAY_MODALITY
from mmv.data.phantom import PHANTOM_FINDINGS, PhantomSettings, write_phantom_dataset
from mmv.demo import DemoSettings, demo_config, initial_encoder, run_demo
from mmv.eval.features import read_feature_table
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
    # The baseline sees the images as the pretrained encoder does: with the run's preprocessing.
    assert initial_encoder(config).preprocess == modality_preprocess(config.data)


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
    # The product's path: a feature table per encoder (the pretraining run's own encoder for "ssl") and
    # the probe runs' reports, whose figures are those the demo reports.
    tables = {name: read_feature_table(tmp_path / "features" / name) for name in ("ssl", "random")}
    assert tables["ssl"].index.same_as(tables["random"].index) and len(tables["ssl"].index) == 2 * TINY.num_phantoms
    records = {name: json.loads((tmp_path / "features" / name / "embed.json").read_text()) for name in tables}
    assert records["ssl"]["checkpoint"] == str(tmp_path / "pretrain" / "encoder")
    assert records["ssl"]["settings"]["preprocess"] == records["random"]["settings"]["preprocess"]
    assert records["ssl"]["settings"]["weights_sha256"] != records["random"]["settings"]["weights_sha256"]
    for modality, tag in (("xray", XRAY_MODALITY), ("ct", CT_MODALITY)):
        for encoder in ("ssl", "random"):
            report = json.loads((tmp_path / "probes" / encoder / f"manifest_{tag}.json").read_text())
            assert report["array"] == "cls+patch_mean" and report["modality"] == tag
            assert report["macro_auroc"] == pytest.approx(written["detail"][modality][encoder]["macro_auroc"], nan_ok=True)
            assert report["rows"]["test"] == written["detail"][modality][encoder]["test_rows"]


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
