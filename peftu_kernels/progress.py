"""Progress that reads well in a terminal (a tqdm bar) and in a log file (a plain line every ~30 s)."""
from __future__ import annotations

import sys
import time


class _LogBar:
    def __init__(self, total: int, desc: str, every: float):
        self.total, self.desc, self.every, self.n, self.post = total, desc, every, 0, {}
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.every:
            self._line()

    def set_postfix(self, refresh: bool = False, **kw) -> None:
        self.post = kw

    def _line(self) -> None:
        self.last = time.perf_counter()
        el = self.last - self.t0
        post = " ".join(f"{k}={v}" for k, v in self.post.items())
        print(f"{self.desc}: {self.n}/{self.total} ({100 * self.n / max(1, self.total):.0f}%) {el:.0f}s {post}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        self._line()


class _Null:
    def update(self, n=1):
        pass

    def set_postfix(self, refresh=False, **kw):
        pass

    def close(self):
        pass


def progress(total: int, desc: str, enabled: bool = True, every: float = 30.0):
    if not enabled:
        return _Null()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=0.2)
    return _LogBar(total, desc, every)
