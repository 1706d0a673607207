"""tf.data input pipelines: training patches and image decoding for inference.

TensorFlow is imported inside the functions so that importing batchsr stays
cheap.  The model itself never sees tf.*: these pipelines hand it NumPy-like
batches.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from loguru import logger

from batchsr.errors import ConfigError, ImageError
from batchsr.imageio import STATE_DIR, probe_decoding_mb, read_image, sniff_file, to_uint8, walk
from batchsr.resize import imresize, resize_matrix


def is_image_file(path: Path) -> bool:
    """True when the file's first bytes are those of a supported image format."""
    try:
        return sniff_file(path) is not None
    except OSError:
        return False


def list_files(folder: Path, recursive: bool = True, problems: list[tuple[Path, str]] | None = None,
               outputs: list[Path] | None = None) -> list[Path]:
    """Regular files under ``folder``, sorted; hidden files and folders skipped.

    Links to folders are followed, each real folder once (a link loop ends there),
    after every folder reached without one and in name order: a folder that is
    also reached through a link keeps its own path as the name (which link the
    file system lists first had decided it, and moving the tree elsewhere
    renamed outputs).
    ``problems`` collects, as ``(path, reason)``, what could not be looked into:
    unreadable folders and broken links. With ``outputs``, a subfolder holding a
    batchsr output's state (another run's OUTPUT) is left out and collected there:
    sibling output folders inside one input folder fed each other, nesting deeper at each run.
    """
    folder = Path(folder)
    found: list[Path] = []
    visited: set[tuple[int, int]] = set()

    def unreadable(exc: OSError) -> None:
        if problems is not None:
            problems.append((Path(exc.filename), f"cannot list folder: {exc.strerror or exc}"))

    linked: list[str] = []  # links to folders, walked once every folder reached without one has been

    def tree():
        yield from walk(folder, onerror=unreadable)
        while linked:
            yield from walk(linked.pop(0), onerror=unreadable)

    for root, dirs, names in tree():
        try:
            info = os.stat(root)
        except OSError as exc:
            unreadable(exc)
            dirs[:] = []
            continue
        if (info.st_dev, info.st_ino) in visited:
            dirs[:] = []
            continue
        visited.add((info.st_dev, info.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        if outputs is not None:  # one look at each subfolder (a membership test in a list was quadratic)
            other = {d for d in dirs if os.path.isdir(os.path.join(root, d, STATE_DIR))}
            outputs.extend(Path(root) / d for d in dirs if d in other)
            dirs[:] = [d for d in dirs if d not in other]
        linked.extend(os.path.join(root, d) for d in dirs if os.path.islink(os.path.join(root, d)))
        for name in names:
            path = Path(root) / name
            if name.startswith("."):
                continue
            if path.is_file():
                found.append(path)
            elif problems is not None and path.is_symlink() and not path.exists():
                problems.append((path, "broken link: its target does not exist"))
    return sorted(found)


def find_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by content), sorted, hidden files and folders skipped. Another run's
    OUTPUT folder inside it is left out, with a warning: its images are upscaled, not high-resolution originals."""
    outputs: list[Path] = []
    found = [path for path in list_files(folder, recursive, outputs=outputs) if is_image_file(path)]
    for output in outputs:
        logger.warning("{}: left out, a batchsr output folder (its images are upscaled ones, not originals)", output)
    return found


def has_transparency(image) -> bool:
    """Whether a decoded image has pixels not fully opaque: their colour is a display fill (or whatever was
    stored under them), not a photo to learn from or score against."""
    return image.alpha is not None and bool((image.alpha < np.iinfo(image.alpha.dtype).max).any())


# The six orders of the RGB planes: ``permute_channels`` shows each patch in one of
# them, six times the colour statistics from the same photos.
CHANNEL_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def load_training_images(folders: Iterable[Path], min_side: int, rescale: Sequence[float] = (1.0,)) -> list[np.ndarray]:
    """All HR images of ``folders`` as 8-bit RGB, each at every ``rescale`` factor
    (MATLAB bicubic, rounded to 8 bits); copies smaller than ``min_side`` are dropped."""
    images, seen, small, transparent, unreadable = [], set(), [], [], []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"train_dirs: {folder} does not exist or is not a folder")
        for path in find_images(folder):
            real = path.resolve()
            if real in seen:  # folders listed twice, or one inside another: each image counts once
                continue
            seen.add(real)
            try:
                image = read_image(path)
            except ImageError as exc:  # one bad file among thousands of a user's own: said, not the end of the run
                unreadable.append(f"{path} ({exc.reason})")
                continue
            if has_transparency(image):
                transparent.append(path)
                continue
            rgb = to_uint8(image.rgb)
            if min(rgb.shape[:2]) < min_side:
                small.append(path)
            for factor in rescale:
                copy = rgb if factor == 1.0 else imresize(rgb, factor)
                if min(copy.shape[:2]) >= min_side:
                    images.append(copy)
    if small:
        logger.warning("{} training images smaller than a patch ({}px a side) are left out: {}", len(small), min_side, _some(small))
    if unreadable:
        logger.warning("{} training images cannot be read and are left out: {}", len(unreadable), _some(unreadable))
    if transparent:
        logger.warning("{} training images with transparency are left out (the colour under transparent pixels is no "
                       "photo): {}", len(transparent), _some(transparent))
    if not images:
        raise ConfigError(f"train_dirs {', '.join(str(f) for f in folders)}: no training images of at least {min_side}px a side "
                          "(patch_size x scale)")
    return images


def _some(paths: list) -> str:
    return ", ".join(str(p) for p in paths[:5]) + (", ..." if len(paths) > 5 else "")


def training_dataset(
    images: list[np.ndarray],
    scale: int,
    patch: int,
    batch_size: int,
    seed: int,
    first_step: int,
    last_step: int,
    augment: bool = True,
    permute_channels: bool = False,
):
    """Batches ``first_step .. last_step - 1`` of an endless, seeded patch stream.

    Example ``n`` depends only on ``(seed, n)``, so a resumed training sees exactly
    the batches an uninterrupted one would.  LR patches are made on the fly with
    the MATLAB-style bicubic degradation, rounded to 8 bits like a saved LR image.
    """
    import tensorflow as tf

    hr_side = patch * scale
    flat = tf.constant(np.concatenate([im.reshape(-1) for im in images]))
    shapes = np.array([im.shape[:2] for im in images], dtype=np.int64)
    offsets = tf.constant(np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1] * 3)[:-1]]))
    heights, widths = tf.constant(shapes[:, 0]), tf.constant(shapes[:, 1])
    # Pick images in proportion to their area, so every pixel is equally likely.
    cumulative = tf.constant(np.cumsum(shapes[:, 0] * shapes[:, 1]) / np.sum(shapes[:, 0] * shapes[:, 1]))
    down = tf.constant(resize_matrix(hr_side, patch).astype(np.float32))
    orders = tf.constant(CHANNEL_ORDERS)

    def example(n):
        key = tf.stack([tf.constant(seed, tf.int64), n])
        u = tf.random.stateless_uniform([4], seed=key, dtype=tf.float32)
        index = tf.minimum(tf.searchsorted(cumulative, tf.cast(u[0:1], tf.float64))[0], len(images) - 1)
        h, w = heights[index], widths[index]
        image = tf.reshape(flat[offsets[index] : offsets[index] + h * w * 3], tf.stack([h, w, 3]))
        top = tf.cast(u[1] * tf.cast(h - hr_side + 1, tf.float32), tf.int64)
        left = tf.cast(u[2] * tf.cast(w - hr_side + 1, tf.float32), tf.int64)
        hr = image[top : top + hr_side, left : left + hr_side]
        if augment:
            code = tf.cast(u[3] * 8.0, tf.int32)
            hr = tf.cond(code % 2 == 1, lambda: tf.reverse(hr, [1]), lambda: hr)
            hr = tf.cond((code // 2) % 2 == 1, lambda: tf.reverse(hr, [0]), lambda: hr)
            hr = tf.cond(code // 4 == 1, lambda: tf.transpose(hr, [1, 0, 2]), lambda: hr)
        if permute_channels:  # its own draw: the crops stay those of a run without it
            v = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(seed, tf.int64), -1 - n]))
            hr = tf.gather(hr, orders[tf.minimum(tf.cast(v * 6.0, tf.int32), 5)], axis=2)
        return tf.ensure_shape(tf.cast(hr, tf.float32), [hr_side, hr_side, 3])

    def settle(x):  # MATLAB rounds and clips an 8-bit image after each axis, halves up
        return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)

    def degrade(hr):
        lr = settle(tf.einsum("ij,bjkc->bikc", down, hr))  # rows first, as MATLAB on a tie
        lr = settle(tf.einsum("bikc,lk->bilc", lr, down))
        return lr / 255.0, hr / 255.0

    return (
        tf.data.Dataset.range(first_step * batch_size, last_step * batch_size)
        .map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size, drop_remainder=True)
        .map(degrade, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def numpy_training_batches(
    images: list[np.ndarray],
    scale: int,
    patch: int,
    batch_size: int,
    seed: int,
    first_step: int,
    last_step: int,
    augment: bool = True,
    permute_channels: bool = False,
    workers: int = 2,
    prefetch: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The training stream without TensorFlow (for the JAX and PyTorch backends).

    Same recipe as ``training_dataset`` — area-weighted random crops, the eight
    flips/rotations, MATLAB-bicubic LR rounded to 8 bits — and, like it, example
    ``n`` depends only on ``(seed, n)``; the random draws differ from the tf.data
    stream, so a run keeps one pipeline from start to end.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    prefetch = prefetch or 2 * workers
    hr_side = patch * scale
    areas = np.array([im.shape[0] * im.shape[1] for im in images], dtype=np.float64)
    cumulative = np.cumsum(areas) / areas.sum()
    down = resize_matrix(hr_side, patch).astype(np.float32)

    def example(n: int) -> np.ndarray:
        rng = np.random.default_rng([seed, n])
        u = rng.random(4)
        image = images[min(int(np.searchsorted(cumulative, u[0])), len(images) - 1)]
        h, w = image.shape[:2]
        top, left = int(u[1] * (h - hr_side + 1)), int(u[2] * (w - hr_side + 1))
        hr = image[top : top + hr_side, left : left + hr_side]
        if augment:
            code = int(u[3] * 8)
            hr = hr[:, ::-1] if code % 2 else hr
            hr = hr[::-1] if (code // 2) % 2 else hr
            hr = hr.transpose(1, 0, 2) if code // 4 else hr
        if permute_channels:
            hr = hr[:, :, CHANNEL_ORDERS[int(rng.random() * 6)]]
        return hr

    def settle(x: np.ndarray) -> np.ndarray:  # MATLAB rounds and clips 8-bit images after each axis
        np.floor(x + np.float32(0.5), out=x)
        return np.clip(x, 0, 255, out=x)

    def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
        # Stack as uint8 and convert once; the separable resize is two batched
        # matrix products over contiguous axes (no transposed copies).
        hr = np.stack([example(step * batch_size + k) for k in range(batch_size)]).astype(np.float32)
        lr = settle(np.matmul(down, hr.reshape(batch_size, hr_side, hr_side * 3)))  # rows first, as MATLAB
        lr = settle(np.matmul(down, lr.reshape(batch_size * patch, hr_side, 3))).reshape(batch_size, patch, patch, 3)
        lr *= np.float32(1 / 255)
        hr *= np.float32(1 / 255)
        return lr, hr

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batchsr-patches") as pool:
        pending = deque(pool.submit(batch, s) for s in range(first_step, min(first_step + prefetch, last_step)))
        next_step = first_step + len(pending)
        while pending:
            yield pending.popleft().result()
            if next_step < last_step:
                pending.append(pool.submit(batch, next_step))
                next_step += 1


class DecodeAhead:
    """Holds the images decoded ahead of their turn to ``limit_mb`` together.

    tf.data decodes ``run.decode_workers`` files at once and keeps more ready;
    a folder of huge scans would otherwise hold several of them decoded before
    the first is planned against ``run.memory_mb``.  Files are admitted to
    decoding one at a time, in order, each reserving ``probe_decoding_mb`` from
    its header; a file waits while the files reserved would pass the limit,
    except the next file the consumer takes, which never waits: the stream
    cannot stall.  A file's reservation ends when it is handed over, or with
    ``keep``, when the consumer releases it or the stream ends (``watch`` holds
    a batch decoded until it is written).  While any key pauses it, only the
    next file is admitted.
    """

    def __init__(self, limit_mb: float, *, keep: bool = False):
        self.limit_mb = limit_mb
        self.keep = keep
        self.peak_mb = 0.0  # the most reserved at once
        self._changed = threading.Condition()
        self._reserved: dict[int, float] = {}
        self._next = 0
        self._pausers: set = set()
        self._closed = False
        self._estimate: Callable[[int], float] = lambda index: 0.0
        self._count = 0
        self._estimates: dict[int, float] = {}  # read from headers, not yet reserved

    def stream(self, estimate: Callable[[int], float], count: int) -> None:
        """The files to admit, ``count`` of them: ``estimate(index)`` reads one's header."""
        with self._changed:
            self._estimate, self._count = estimate, count

    def estimate_mb(self, index: int) -> float:
        with self._changed:
            if index in self._estimates or index >= self._count:
                return self._estimates.get(index, 0.0)
            estimate = self._estimate
        mb = estimate(index)  # a header read: not under the lock
        with self._changed:
            if index in self._reserved:  # admitted meanwhile: nothing left to keep for it
                return mb
            return self._estimates.setdefault(index, mb)

    @property
    def pending_mb(self) -> float:
        """What the files admitted reserve, and the next file's estimate before it is admitted: it never waits."""
        with self._changed:  # only the consumer moves the next file on: it cannot change under its plan
            upcoming = self._next
            admitted = self._closed or upcoming in self._reserved
        next_mb = 0.0 if admitted else self.estimate_mb(upcoming)
        with self._changed:
            return self._total() + (0.0 if self._closed or upcoming in self._reserved else next_mb)

    def reserve(self, index: int, mb: float) -> None:
        with self._changed:
            while not self._closed and index != self._next and self._total() + mb > self._limit():
                self._changed.wait()
            self._estimates.pop(index, None)
            if self._closed:
                return
            self._reserved[index] = self._reserved.get(index, 0.0) + mb
            self.peak_mb = max(self.peak_mb, self._total())

    def _total(self) -> float:
        return sum(self._reserved.values())

    def _limit(self) -> float:
        return 0.0 if self._pausers else self.limit_mb

    def handed_over(self, index: int) -> None:
        with self._changed:
            if not self.keep:
                self._reserved.pop(index, None)
            self._next = index + 1
            self._changed.notify_all()

    def pause(self, key) -> float:
        """Only the next file is admitted until ``resume(key)``; returns ``pending_mb``."""
        with self._changed:
            self._pausers.add(key)
        return self.pending_mb

    def release(self, index: int) -> None:
        """A file taken that holds nothing decoded (broken, a duplicate) gives its reservation back."""
        with self._changed:
            self._reserved.pop(index, None)
            self._changed.notify_all()

    def resume(self, key) -> None:
        with self._changed:
            self._pausers.discard(key)
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        with self._changed:
            return self._closed

    def close(self) -> None:
        """The stream ended or was abandoned: files waiting, and any that come after, decode nothing."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


def prepared_files(paths: list[Path], prepare: Callable[[Path], object], workers: int, prefetch: int = 8,
                   ahead: DecodeAhead | None = None, max_pixels: int | None = None) -> Iterator[object]:
    """Yields ``prepare(path)`` for every path, in order, computed in parallel ahead of use.

    A tf.data pipeline runs ``prepare`` (read, hash, decode) on ``workers`` threads
    and keeps ``prefetch`` results ready, overlapping file I/O with inference.
    With ``ahead``, a first stage admits files to it one at a time, in order,
    within ``ahead``'s memory limit; only that stage ever waits, so decoding
    always goes on for the files admitted (a file above ``max_pixels``
    reserves its size on disk: decoding refuses it from its header).
    ``prepare`` must return errors as values: one bad file never stops the
    stream.
    """
    if not paths:
        return
    from batchsr.tfimport import import_tensorflow

    import_tensorflow()
    import tensorflow as tf

    results: dict[int, object] = {}

    def admit(index):
        ahead.reserve(int(index), ahead.estimate_mb(int(index)))
        return index

    def run(index):
        i = int(index)
        if ahead is None or not ahead.closed:
            results[i] = prepare(paths[i])
        return np.int64(i)

    dataset = tf.data.Dataset.range(len(paths))
    if ahead is not None:
        ahead.stream(lambda index: probe_decoding_mb(paths[index], max_pixels), len(paths))
        dataset = dataset.map(lambda i: tf.numpy_function(admit, [i], tf.int64, stateful=True))  # sequential
    dataset = dataset.map(
        lambda i: tf.numpy_function(run, [i], tf.int64, stateful=True), num_parallel_calls=workers, deterministic=True,
    ).prefetch(prefetch)
    options = tf.data.Options()
    options.threading.private_threadpool_size = workers + 2  # decoding never waits for a thread the admitting stage holds
    iterator = dataset.with_options(options).as_numpy_iterator()
    try:
        for index in iterator:
            item = results.pop(int(index))
            if ahead is not None:
                ahead.handed_over(int(index))
            yield item
    finally:
        if ahead is not None:
            ahead.close()  # before the iterator goes, which waits for its stages
        del iterator
