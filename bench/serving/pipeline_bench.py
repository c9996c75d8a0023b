"""End to end in one process vs the sum of its parts, and the decoding fast path.

- decode + resize + crop alone (Pillow, one thread per core), the model alone (batches of 16),
  and the two together (threads decode the next photos while the model runs the last batch);
  "what the parts allow" is 1 / (1/decode + 1/model): both share the same cores.
- large JPEGs decoded in full vs with Pillow's ``draft`` (libjpeg's DCT scaling), and the cost
  of stacking crops into the batch.

Usage: python bench/serving/pipeline_bench.py [--model models/default]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

from extendserve.photos.preprocess import decode, prepare, resize_crop  # noqa: E402
from extendserve.serving.runtime import Model  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # bench/common.py
from common import best_rate, generated, photos, write_section  # noqa: E402

BATCH = 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/default")
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    data, what = photos()
    m = Model(a.model)
    cfg = m.preprocess
    pool = ThreadPoolExecutor(cores)

    def decode_all() -> list[np.ndarray]:
        return list(pool.map(lambda b: prepare(b, cfg), data))

    crops = decode_all()
    batches = [np.stack(crops[i : i + BATCH]) for i in range(0, len(crops) - BATCH + 1, BATCH)]
    n_model = len(batches) * BATCH

    def model_all() -> None:
        for x in batches:
            m.run(x)

    def end_to_end() -> None:
        it = pool.map(lambda b: prepare(b, cfg), data)
        buf: list[np.ndarray] = []
        for crop in it:
            buf.append(crop)
            if len(buf) == BATCH:
                m.run(np.stack(buf))
                buf.clear()
        if buf:
            m.run(np.stack(buf))

    r_dec = best_rate(decode_all, len(data), 3, 1.0)
    r_model = best_rate(model_all, n_model, 3, 1.0)
    r_e2e = best_rate(end_to_end, len(data), 3, 1.0)
    allowed = 1 / (1 / r_dec + 1 / r_model)
    stack_us = best_rate(lambda: np.stack(crops[:32]), 32, 3, 0.2)
    lines = [f"Photos: {what}; model: {a.model}; {cores} decode threads; model batches of {BATCH}.", "",
             "| stage | photos/s |", "| --- | --- |",
             f"| decode + resize + crop alone ({cores} threads) | {r_dec:.1f} |",
             f"| model alone (batch {BATCH}) | {r_model:.1f} |",
             f"| what the two allow together, 1/(1/decode + 1/model) | {allowed:.1f} |",
             f"| end to end, decode overlapped with the model | {r_e2e:.1f} "
             f"(**{r_e2e / allowed:.2f}** of what the parts allow) |",
             "", f"Stacking 32 crops into one uint8 batch: {1e6 / stack_us:.1f} us a photo "
             f"({100 * r_e2e / stack_us:.2f}% of end-to-end time): copying is not where the time goes."]
    print("\n".join(lines), flush=True)

    lines += ["", "### Decoding large JPEGs: full decode vs draft (libjpeg DCT scaling), one thread", "",
              "| photos | full decode photos/s | with draft photos/s | speed-up | mean abs grey-level difference of the crop |",
              "| --- | --- | --- | --- | --- |"]
    for size in ((4000, 3000), (1600, 1200)):
        big = generated(6, size)
        full = best_rate(lambda: [resize_crop(decode(b), cfg) for b in big], len(big), 3, 1.0)
        fast = best_rate(lambda: [resize_crop(decode(b, min_side=cfg.resize), cfg) for b in big], len(big), 3, 1.0)
        diff = np.mean([np.abs(resize_crop(decode(b), cfg).astype(int) - resize_crop(decode(b, min_side=cfg.resize), cfg)).mean()
                        for b in big])
        lines.append(f"| {size[0]}x{size[1]} JPEG q90 | {full:.1f} | {fast:.1f} | {fast / full:.1f}x | {diff:.2f} |")
        print(lines[-1], flush=True)
    from PIL import Image

    small = [b for b in data if min(Image.open(io.BytesIO(b)).size) < 2 * cfg.resize]
    same = sum(np.array_equal(resize_crop(decode(b), cfg), resize_crop(decode(b, min_side=cfg.resize), cfg)) for b in small)
    lines.append(f"\n{len(data) - len(small)} of the {len(data)} benchmark photos are at least twice the resize target "
                 f"and take the draft path; {same} of the other {len(small)} decode bit-identically with it on.")
    write_section("pipeline", "In-process pipeline: end to end vs its parts", "python bench/serving/pipeline_bench.py",
                  "\n".join(lines))
    print(lines[-1])


if __name__ == "__main__":
    main()
