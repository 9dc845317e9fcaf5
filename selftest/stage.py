"""One `routesae` command run exactly as `python -m routesae ARGS` runs it, which then records its
peak memory (GPU and resident) for the self-test: `python -m routesae.selftest.stage RECORD ARGS...`."""

from __future__ import annotations

import atexit
import resource
import sys


def _record(path: str) -> None:
    from routesae.atomic_files import write_json

    gpu = gpu_reserved = None
    torch = sys.modules.get("torch")  # the command imported it (every stage does); never imported here
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        # what the caching allocator held (tensors + its free blocks): nearer what a card must have
        gpu_reserved = max(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count()))
    # ru_maxrss is in KiB on Linux; the children are the fit's loader process and the like
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    write_json(path, {"peak_gpu_bytes": gpu, "peak_gpu_reserved_bytes": gpu_reserved, "peak_rss_bytes": own,
                      "peak_rss_children_bytes": children}, durable=False)


def main() -> None:
    record, args = sys.argv[1], sys.argv[2:]
    atexit.register(_record, record)  # also after click's sys.exit, and after a one-line error
    sys.argv = ["routesae", *args]
    from routesae.cli import main as routesae

    routesae(prog_name="routesae")


if __name__ == "__main__":
    main()
