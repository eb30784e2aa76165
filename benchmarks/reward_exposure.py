"""How much host reward time a training run left exposed, from its metrics.jsonl.

Each RL step checks the rewards in worker processes while the device computes the reference
log-probs; `reward_s` is how long the checks took, `reward_wait_s` how long the host still
waited for them after dispatching the device work. Usage:

    python benchmarks/reward_exposure.py WORKDIR [WORKDIR ...]
"""

import json
import sys

import numpy as np


def main(workdirs):
  for workdir in workdirs:
    with open(f"{workdir}/metrics.jsonl") as f:
      rows = {m["step"]: m for m in map(json.loads, f)}  # last line of each step wins
    rows = [m for m in rows.values() if "reward_s" in m][1:]  # drop the compiling step
    if not rows:
      print(f"{workdir}: no RL steps with reward timings")
      continue
    reward = np.array([m["reward_s"] for m in rows])
    wait = np.array([m["reward_wait_s"] for m in rows])
    step = np.array([m["step_time_s"] for m in rows])
    print(f"{workdir}: {len(rows)} steps | step {step.mean():.3f}s | rewards {reward.mean():.3f}s"
          f" | exposed wait {wait.mean():.3f}s = {wait.sum() / reward.sum():.0%} of reward time,"
          f" {wait.sum() / step.sum():.1%} of step time")


if __name__ == "__main__":
  main(sys.argv[1:])
