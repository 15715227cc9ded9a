"""Progress bars for the benchmark (tqdm on stderr; a no-op stand-in when disabled)."""
from __future__ import annotations

import contextlib


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True):
    if not enabled:
        yield _Silent()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, leave=False) as bar:
        yield bar
