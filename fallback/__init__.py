"""The CPU fallback path of gds-stream: memmap/preadv worker threads into a (pinned) host ring.

Used wherever GPUDirect Storage through KvikIO is unavailable, and the bit-for-bit reference the
GPU-direct loader is tested against.
"""

from .loader import FallbackLoader

__all__ = ["FallbackLoader"]
