"""Throughput of eGeMAPS measurement (pallm.acoustics.extract_functionals), cold cache.

    python benchmarks/cue_throughput.py                 # 200 synthetic 3 s clips
    python benchmarks/cue_throughput.py --n 400 --dur 5
    python benchmarks/cue_throughput.py --manifest path/to/corpus --n 500

Times include starting the worker processes, as a real run pays for them. Not a test.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from pallm.acoustics import features  # noqa: E402
from pallm.data.audio import SAMPLE_RATE, audio_duration, write_audio  # noqa: E402
from pallm.data.manifest import Row, read_manifest  # noqa: E402


def synth_rows(folder: Path, n: int, dur: float) -> list[Row]:
    """Vowel-like harmonic buzz with varied f0, syllable rate and loudness."""
    rng = np.random.default_rng(0)
    t = np.arange(int(dur * SAMPLE_RATE)) / SAMPLE_RATE
    rows = []
    for i in range(n):
        f0, rate, amp = rng.uniform(90, 260), rng.uniform(2, 6), rng.uniform(0.05, 0.3)
        phase = 2 * np.pi * np.cumsum(f0 * 2 ** (np.sin(2 * np.pi * 0.7 * t) / 12)) / SAMPLE_RATE
        x = sum(np.sin(k * phase) / k for k in range(1, 15)) * ((t * rate) % 1.0 < 0.6)
        x = x + 0.01 * rng.standard_normal(len(t))
        write_audio(folder / f"{i}.wav", (amp * x / np.abs(x).max()).astype(np.float32))
        rows.append(Row(id=str(i), audio=str(folder / f"{i}.wav"), corpus="bench", speaker="s", split="train"))
    return rows


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="number of clips")
    ap.add_argument("--dur", type=float, default=3.0, help="synthetic clip length (s)")
    ap.add_argument("--manifest", help="measure this corpus's first N clips instead of synthetic ones")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.manifest:
            rows = read_manifest(args.manifest)[: args.n]
        else:
            rows = synth_rows(tmp, args.n, args.dur)
        audio_s = sum(audio_duration(r.audio) for r in rows)
        print(f"{len(rows)} clips, {audio_s:.0f} s of audio (mean {audio_s / len(rows):.1f} s)")
        # Other work on the machine skews the numbers; show how busy it was.
        print(f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}")
        for w in (int(x) for x in args.workers.split(",")):
            cache = tmp / f"cache_w{w}.parquet"  # fresh cache: every clip is measured
            t0, c0 = time.perf_counter(), _cpu()
            features.extract_functionals(rows, cache, num_workers=w)
            cold, cpu = time.perf_counter() - t0, _cpu() - c0
            t0 = time.perf_counter()
            features.extract_functionals(rows, cache, num_workers=w)
            warm = time.perf_counter() - t0
            print(
                f"workers={w}: {len(rows) / cold:6.1f} utt/s  ({audio_s / cold:5.0f}x real time, {cold:.2f} s);"
                f"  cache hit: {warm:.2f} s"
            )
            # CPU time (this process + finished workers) does not depend on what else the machine
            # runs: utt per CPU-second is one free core's speed; cores used shows the parallelism.
            print(f"           {len(rows) / cpu:6.1f} utt per CPU-second, {cpu / cold:.2f} cores busy on average")


if __name__ == "__main__":  # required: worker processes are spawned and re-import this module
    main()
