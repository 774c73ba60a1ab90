"""RawTransferProbe: a transport's raw GB/s (one large contiguous write into a peer process)
sampled every few seconds while a benchmark runs, so the rate a workload's KV transfers reach
is compared with the raw rate under the same load on the machine, not a quiet one."""

from __future__ import annotations

import statistics
import threading
import time

import torch

from ember.bench.kv_transfer import Receiver
from ember.kv.transfer import make_transport


class RawTransferProbe:
    """Use as a context manager; `samples_gb_s` holds one rate per probe write."""

    def __init__(self, backend: str, nbytes: int = 256 << 20, every_s: float = 5.0,
                 timeout_s: float = 120.0) -> None:
        self.nbytes, self.every_s = nbytes, every_s
        self.samples_gb_s: list[float] = []
        self._receiver = Receiver(backend, nbytes, timeout_s)
        self._transport = make_transport(backend, timeout_s=timeout_s)
        self._source = torch.ones(nbytes, dtype=torch.uint8)  # every page touched
        self._transport.register(self._source)
        self._transport.connect(self._receiver.descriptor)  # its set-up is not a sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raw-probe", daemon=True)

    def __enter__(self) -> RawTransferProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._transport.close()
        self._receiver.stop()

    @property
    def median_gb_s(self) -> float | None:
        return statistics.median(self.samples_gb_s) if self.samples_gb_s else None

    def _run(self) -> None:
        whole = [(0, 0, self.nbytes)]
        while not self._stop.wait(self.every_s):
            start = time.perf_counter()
            self._transport.write(self._receiver.descriptor, whole)
            self.samples_gb_s.append(self.nbytes / (time.perf_counter() - start) / 1e9)
