"""Distributed pretraining: two CPU processes under torchrun (gloo) stay in step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent

WORKER = """
import hashlib, json, sys
import torch
import torch.distributed as dist
from helpers.training import SyntheticImages, tiny_config
from mmv.train import Trainer

out = sys.argv[1]
trainer = Trainer(tiny_config(out, steps=3), dataset=SyntheticImages(count=18))
history = trainer.train()
digest = hashlib.sha256()
for tensor in trainer.student.state_dict().values():
    digest.update(tensor.detach().contiguous().numpy().tobytes())
rank = dist.get_rank()
with open(f"{out}/rank{rank}.json", "w") as stream:
    json.dump({"world": dist.get_world_size(), "weights": digest.hexdigest(), "losses": [r["loss"] for r in history],
               "batches": len(trainer.sampler)}, stream)
dist.destroy_process_group()
"""


def test_two_cpu_processes_train_one_model(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), environment.get("PYTHONPATH", "")])
    environment["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
        env=environment, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["world"] == 2 for rank in ranks)
    # Gradients were averaged: both processes end with bit-identical weights, after different data.
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["losses"] != ranks[1]["losses"]
    metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3]
    checkpoint = torch.load(tmp_path / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert len(checkpoint["rng"]) == 2
