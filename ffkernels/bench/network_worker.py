"""``python -m ffkernels.bench.network_worker CONFIG_JSON``: measure the training memory of one network
configuration in this fresh process (so it owns its peak RSS); print the result as one JSON line on stdout."""
from __future__ import annotations

import json
import sys

from .network import NetConfig, measure_memory


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m ffkernels.bench.network_worker CONFIG_JSON")
    result = measure_memory(NetConfig(**json.loads(argv[0])))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
