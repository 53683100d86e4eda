"""eGeMAPS v02 functionals (88 per utterance), measured once per audio file and cached.

Measuring a corpus takes minutes (~40 utterances/s per core), so results are kept in a parquet
cache keyed by (audio path, channel, file size, mtime): re-runs only measure rows that are new or
whose file changed. The cache is derived data; if it is unreadable it is rebuilt, never trusted.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from pallm.data.audio import SAMPLE_RATE, load_audio
from pallm.data.manifest import Row
from pallm.errors import AudioError

ProgressFn = Callable[[int, int], None]
"""Called as progress(done, total) with the number of files measured so far and to measure."""

_KEY_COLS = ["path", "channel", "size", "mtime_ns"]
_NO_CHANNEL = -1  # parquet column is int64; -1 stands for "mix all channels to mono"
_BATCH = 16  # files per worker task: amortises inter-process overhead, keeps progress smooth
_MIN_PARALLEL = 64  # below this, starting worker processes (~1 s) costs more than it saves
_SAVE_EVERY = 2000  # flush the cache during long runs so a crash or Ctrl-C loses little work

_smile = None  # one opensmile.Smile per process, built lazily (workers build their own)


def _get_smile():
    global _smile
    if _smile is None:
        import opensmile

        _smile = opensmile.Smile(
            feature_set=opensmile.FeatureSet.eGeMAPSv02,
            feature_level=opensmile.FeatureLevel.Functionals,
        )
    return _smile


def feature_names() -> list[str]:
    """The 88 eGeMAPS v02 functional names, in opensmile's order."""
    return list(_get_smile().feature_names)


def measure_file(path: str, channel: int | None = None) -> np.ndarray:
    """The 88 functionals of one file (float32; all NaN when the clip is too short to measure)."""
    wav = load_audio(path, channel=channel)
    try:
        with warnings.catch_warnings():
            # opensmile warns and fills NaN for clips under ~0.1 s; cues.py omits NaN cues.
            warnings.simplefilter("ignore", UserWarning)
            df = _get_smile().process_signal(wav, SAMPLE_RATE)
    except Exception as e:
        raise AudioError(f"{path}: openSMILE could not measure this audio ({e}). Drop the row.") from None
    return df.to_numpy(dtype=np.float32)[0]


def _measure_batch(items: Sequence[tuple[str, int]]) -> list[np.ndarray]:
    # Runs in a worker process: module-level so it pickles by name.
    return [measure_file(p, None if c == _NO_CHANNEL else c) for p, c in items]


def _row_key(row: Row) -> tuple[str, int]:
    channel = getattr(row, "channel", None)  # extra field on stereo conversational corpora
    return os.path.abspath(row.audio), _NO_CHANNEL if channel is None else int(channel)


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        # Same wording as load_audio, but found before any measuring starts (fail fast).
        raise AudioError(f"{path}: audio file not found. Check the manifest's 'audio' field.") from None
    return st.st_size, st.st_mtime_ns


def _read_cache(path: Path, names: list[str]) -> dict[tuple[str, int], tuple[int, int, np.ndarray]]:
    if not path.exists():
        return {}
    try:
        df = pd.read_parquet(path)
        if list(df.columns) != _KEY_COLS + names:
            raise ValueError("columns differ (other feature set or version)")
    except Exception as e:
        warnings.warn(f"{path}: ignoring unusable feature cache ({e}); re-measuring.", stacklevel=3)
        return {}
    feats = df[names].to_numpy(dtype=np.float32)
    keys = zip(df["path"], df["channel"], df["size"], df["mtime_ns"])
    return {(p, int(c)): (int(s), int(m), feats[i]) for i, (p, c, s, m) in enumerate(keys)}


def _write_cache(path: Path, cache: dict, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(cache)
    df = pd.DataFrame(
        np.stack([cache[k][2] for k in keys]) if keys else np.empty((0, len(names)), np.float32),
        columns=names,
    )
    df.insert(0, "path", [k[0] for k in keys])
    df.insert(1, "channel", np.array([k[1] for k in keys], dtype=np.int64))
    df.insert(2, "size", np.array([cache[k][0] for k in keys], dtype=np.int64))
    df.insert(3, "mtime_ns", np.array([cache[k][1] for k in keys], dtype=np.int64))
    # Atomic like write_manifest: a crash leaves the old cache or the new one, never half a file.
    fd, tmp = tempfile.mkstemp(prefix=".egemaps.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _run(
    todo: list[tuple[str, int]], num_workers: int
) -> Iterator[tuple[list[tuple[str, int]], list[np.ndarray]]]:
    """Yield (batch of keys, their features) as batches finish."""
    batches = [todo[i : i + _BATCH] for i in range(0, len(todo), _BATCH)]
    if num_workers <= 1 or len(todo) < _MIN_PARALLEL:
        for b in batches:
            yield b, _measure_batch(b)
        return
    # "spawn", not fork: callers (training) may have torch/OpenMP threads running, and forking a
    # threaded process can deadlock. Workers import only numpy/soundfile/opensmile (~0.5 s).
    ex = ProcessPoolExecutor(num_workers, mp_context=mp.get_context("spawn"))
    try:
        futures = {ex.submit(_measure_batch, b): b for b in batches}
        for f in as_completed(futures):
            yield futures[f], f.result()
    finally:
        # On an error (corrupt file) or Ctrl-C, drop queued batches instead of measuring them all.
        ex.shutdown(wait=True, cancel_futures=True)


def extract_functionals(
    rows: Iterable[Row],
    cache_path: str | os.PathLike,
    num_workers: int = 2,
    progress: ProgressFn | None = None,
) -> pd.DataFrame:
    """eGeMAPS v02 functionals for `rows`: a DataFrame indexed by row id with 88 columns.

    Audio paths should be absolute (as `read_manifest` returns them). Only files missing from the
    cache at `cache_path`, or changed since (size or mtime), are measured. A missing file raises
    AudioError before anything is measured; a corrupt one raises it when reached, after saving
    what was measured so far. With num_workers > 1 and 64+ files to measure, worker processes are
    spawned: a script calling this must do so under `if __name__ == "__main__":`.
    """
    rows = list(rows)
    cache_path = Path(cache_path)
    names = feature_names()
    row_keys = [_row_key(r) for r in rows]
    stats = {k: _stat(k[0]) for k in dict.fromkeys(row_keys)}  # each file once, in order
    cache = _read_cache(cache_path, names)
    todo = [k for k, st in stats.items() if k not in cache or cache[k][:2] != st]

    if todo:
        done = unsaved = 0
        if progress:
            progress(0, len(todo))
        try:
            # closing(): shut the pool down now even if a progress callback raises.
            with closing(_run(todo, num_workers)) as results:
                for batch, feats in results:
                    for k, v in zip(batch, feats):
                        cache[k] = (*stats[k], v)
                    done += len(batch)
                    unsaved += len(batch)
                    if unsaved >= _SAVE_EVERY:
                        _write_cache(cache_path, cache, names)
                        unsaved = 0
                    if progress:
                        progress(done, len(todo))
        finally:
            if unsaved:
                _write_cache(cache_path, cache, names)

    data = np.stack([cache[k][2] for k in row_keys]) if rows else np.empty((0, len(names)), np.float32)
    return pd.DataFrame(data, index=pd.Index([r.id for r in rows], name="id"), columns=names)


@contextmanager
def rich_progress(description: str = "Measuring acoustic features") -> Iterator[ProgressFn]:
    """A ready-made `progress` callback drawing a rich progress bar, for CLI use."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    ) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
