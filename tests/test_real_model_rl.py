"""Stage I on a real model: SmolLM2-135M-Instruct (shipped GGUF) with GSM8K prompts, on a CPU."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_step_stage1_on_smollm2_with_gsm8k(tmp_path):
  args = ["--gin_file=stage1.gin", "--gin_file=tasks/gsm8k.gin",
          "--gin_file=models/smollm2_135m.gin", f"--gin.WORKDIR='{tmp_path}'",
          "--gin.stage1/RunConfig.steps=2", "--gin.RunConfig.batch_prompts=2",
          "--gin.RunConfig.samples_per_prompt=2", "--gin.RunConfig.max_new_tokens=12",
          "--gin.RunConfig.max_prompt_len=320", "--gin.RunConfig.checkpoint_every=2",
          "--gin.RunConfig.reward_workers=1", "--gin.RunConfig.log_every=1"]
  proc = subprocess.run([sys.executable, "-m", "score_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "metrics.jsonl") as f:
    metrics = [json.loads(line) for line in f]
  assert [m["step"] for m in metrics] == [1, 2]
  assert all(0.0 <= m["reward_t2"] <= 1.0 for m in metrics)
  assert metrics[0]["kl_t1"] < 1e-4  # policy == reference at the first step
  assert (tmp_path / "checkpoints" / "2").is_dir()
  assert (tmp_path / "export" / "model_config.json").exists()
