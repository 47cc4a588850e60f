"""Wall time and peak memory of building a visual hierarchy at scale.

Each case runs in a fresh worker process, so that its peak resident memory
(``ru_maxrss``) is its own: synthetic deep features (a Gaussian mixture, a few
rows per class) are generated, then ``Hierarchy.from_features`` runs (class
means, the self-tuned σ of Eq. 3, recursive balanced k-means). The table gives
the time of each step, the peak RSS of the worker (inputs, Python and torch
included) and the largest group of each level relative to N/N_l.

    python benchmarks/hierarchy_scale.py                 # both targets
    python benchmarks/hierarchy_scale.py --cases 10000   # one case

Targets (2-core CPU): N = 10 000, d = 512 in <= 10 s; N = 100 000, d = 256 in
<= 180 s with peak memory <= 8 GB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

# (N, d, level sizes, target seconds, target peak GB)
CASES = {
    10_000: (10_000, 512, (10, 100, 1000), 10.0, None),
    100_000: (100_000, 256, (100, 1000, 10_000), 180.0, 8.0),
}
ROWS_PER_CLASS = 4


def _worker(num_classes: int, dim: int, levels: tuple[int, ...], device: str, seed: int) -> dict:
    import torch

    from lmm_fast.hierarchy import Hierarchy, class_means, self_tuning_sigma

    gen = torch.Generator().manual_seed(seed)
    # Class means around num_classes / 100 mixture centres, then noisy rows per class.
    centres = torch.randn(max(2, num_classes // 100), dim, generator=gen) * 3.0
    means = centres[torch.randint(centres.shape[0], (num_classes,), generator=gen)]
    means += torch.randn(num_classes, dim, generator=gen)
    labels = torch.arange(num_classes).repeat(ROWS_PER_CLASS)
    features = means[labels]
    features += 0.5 * torch.randn(features.shape, generator=gen)
    del means
    features, labels = features.to(device), labels.to(device)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    timings = {}
    start = time.perf_counter()
    class_repr = class_means(features, labels)
    timings["class_means"] = time.perf_counter() - start
    tick = time.perf_counter()
    sigma = self_tuning_sigma(class_repr, seed=seed)
    timings["sigma"] = time.perf_counter() - tick
    tick = time.perf_counter()
    h = Hierarchy.from_class_means(class_repr, list(levels), sigma=sigma, seed=seed)
    timings["clustering"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ratios = [int(s.max()) / (num_classes / k) for s, k in zip(h.group_sizes(), levels)]
    return {
        "N": num_classes,
        "d": dim,
        "M": int(labels.numel()),
        "levels": list(levels),
        "sigma": sigma,
        "seconds": timings,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "inputs_rss_bytes": rss_inputs,
        "max_group_over_mean": ratios,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(str(n) for n in CASES), help="comma-separated N values from %s" % list(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        n = int(args.worker)
        num_classes, dim, levels, _, _ = CASES[n]
        print(json.dumps(_worker(num_classes, dim, levels, args.device, args.seed)))
        return 0

    results = []
    for case in (int(c) for c in args.cases.split(",")):
        if case not in CASES:
            parser.error(f"unknown case {case}; choose from {list(CASES)}")
        command = [sys.executable, os.path.abspath(__file__), "--worker", str(case), "--device", args.device, "--seed", str(args.seed)]
        load_before = os.getloadavg()[0]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["load_average_before"] = load_before
        result["target_seconds"], result["target_peak_gb"] = CASES[case][3], CASES[case][4]
        results.append(result)

    print(f"# hierarchy_scale: {datetime.date.today().isoformat()}, {_cpu_name()}, {os.cpu_count()} cores, "
          f"torch {results[0]['torch']}, device {args.device}")
    print("| N | d | M rows | levels | class means s | sigma s | clustering s | total s | target s | peak RSS GB | max group / (N/N_l) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["seconds"]
        target = f"<= {r['target_seconds']:g}"
        peak = f"{r['peak_rss_bytes'] / 1e9:.2f}"
        if r["target_peak_gb"]:
            peak += f" (<= {r['target_peak_gb']:g})"
        ratios = ", ".join(f"{x:.2f}" for x in r["max_group_over_mean"])
        print(f"| {r['N']:,} | {r['d']} | {r['M']:,} | {','.join(map(str, r['levels']))} | {s['class_means']:.2f} | "
              f"{s['sigma']:.2f} | {s['clustering']:.2f} | {s['total']:.2f} | {target} | {peak} | {ratios} | "
              f"{r['load_average_before']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    failed = [r["N"] for r in results if r["seconds"]["total"] > r["target_seconds"]
              or (r["target_peak_gb"] and r["peak_rss_bytes"] > r["target_peak_gb"] * 1e9)]
    if failed:
        print(f"targets missed for N = {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
