"""``python -m ffkernels.bench.network_worker CONFIG_JSON``: measure the training memory of one network
configuration (a NetConfig, or a ConvNetConfig: ``"model": "cnn"``) in this fresh process (so it owns its peak RSS);
print the result as one JSON line on stdout."""
from __future__ import annotations

import json
import sys

from .conv_network import ConvNetConfig
from .network import NetConfig, measure_memory


def config_from_json(text: str):
    """The configuration ``measure_memory_isolated`` sent: ``asdict`` of a NetConfig or a ConvNetConfig."""
    d = json.loads(text)
    return ConvNetConfig(**d) if d.get("model") == "cnn" else NetConfig(**d)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m ffkernels.bench.network_worker CONFIG_JSON")
    result = measure_memory(config_from_json(argv[0]))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
