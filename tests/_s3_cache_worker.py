"""A loader process over an s3:// dataset with a shared block cache (tests/test_storage_cache.py).

argv: URL CACHE_DIR CACHE_BYTES BLOCK_BYTES EPOCHS OUT.npz [ENDPOINT]
Writes, per epoch, the pid field of every batch concatenated (the points in yielded order).
"""

import sys

import numpy as np

import gds_stream
from gds_stream.storage import cache

url, cdir, budget, block, epochs, out = sys.argv[1:7]
opts = {"endpoint": sys.argv[7], "timeout_s": 30.0} if len(sys.argv) > 7 else None
cache.CACHE_BLOCK_BYTES = int(block)
ds = gds_stream.open_dataset(url, storage_options=opts, cache_dir=cdir, cache_bytes=int(budget))
res = {}
with gds_stream.open_loader(ds, backend="fallback", device="cpu", fields=["pid", "x"],
                            batch_points=25_000, shuffle=True, seed=7,
                            shuffle_window=50_000, num_threads=2) as ld:
    for e in range(int(epochs)):
        ld.set_epoch(e)
        b = list(ld)
        res[f"pid{e}"] = np.concatenate([t["pid"].numpy() for t in b])
        res[f"x{e}"] = np.concatenate([t["x"].numpy() for t in b])
res.update({k: np.int64(v) for k, v in ds.cache.stats().items()})
np.savez(out, **res)
