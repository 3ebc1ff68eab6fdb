"""Which encoder serves decisions: loaded at start, swapped when a newer checkpoint appears.

The worker is pointed at a checkpoint path (``worker.checkpoint``). Publishing a new model is
replacing what that path names, atomically: train into a new directory, then re-point a
symlink (``ln -sfn models/v2 models/current``) or rename the directory into place. The watcher
polls the path's manifest every ``worker.model_poll_seconds``; when the content hash
(``model_version``) changes it loads the new checkpoint off the event loop and swaps it in
between two micro-batches, with no restart. A checkpoint that fails to load leaves the
previous model serving (or none: decisions then carry ``model_unavailable`` and have no push
candidates, since popularity lives in the checkpoint too), counts
``promo_encoder_failures_total{stage="load"}``, and is tried again once the path names another
version; a missing path is looked at on every poll.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from stream.metrics import Metrics
from stream.policy import ServingModel

log = logging.getLogger(__name__)


class ModelWatcher:
    def __init__(self, path: str | Path | None, metrics: Metrics) -> None:
        self.path = Path(path) if path else None
        self.metrics = metrics
        self._encoder: ServingModel | None = None
        self._failed_version: str | None = None

    @property
    def encoder(self) -> ServingModel | None:
        return self._encoder

    @property
    def version(self) -> str:
        return self._encoder.model_version if self._encoder is not None else "none"

    def _published_version(self) -> str | None:
        """The model_version the path names now, read cheaply from its manifest."""
        assert self.path is not None
        try:
            manifest = json.loads((self.path / "manifest.json").read_text())
            return str(manifest["model_version"])
        except (OSError, ValueError, KeyError):
            return None

    def load_now(self) -> bool:
        """Load synchronously (at start-up); True if a model serves afterwards."""
        if self.path is None:
            log.warning("no checkpoint configured: deciding with fallbacks only")
            self.metrics.model_loaded.set(0)
            return False
        self._load()
        return self._encoder is not None

    async def poll(self) -> bool:
        """Swap in a newer checkpoint if one was published; True if the model changed."""
        if self.path is None:
            return False
        published = self._published_version()
        if published is None or published in (self.version, self._failed_version):
            return False
        return await asyncio.to_thread(self._load)

    def _load(self) -> bool:
        from encoder.inference import CheckpointError, Encoder

        assert self.path is not None
        try:
            encoder = Encoder.load(self.path)
        except (CheckpointError, OSError) as exc:
            self._failed_version = self._published_version()
            self.metrics.encoder_failures.labels(stage="load").inc()
            log.error("cannot load checkpoint %s: %s", self.path, exc,
                      extra={"serving": self.version})
            self.metrics.model_loaded.set(1 if self._encoder is not None else 0)
            return False
        previous, self._encoder = self.version, encoder
        self._failed_version = None
        self.metrics.model_loaded.set(1)
        self.metrics.model_info.info({"version": encoder.model_version,
                                      "path": str(self.path)})
        log.info("model loaded", extra={"model_version": encoder.model_version,
                                        "previous": previous, "path": str(self.path)})
        return True
