"""Which models serve decisions: loaded at start, swapped when a newer checkpoint appears.

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

The uplift model (``worker.uplift_checkpoint``, written by `promo train-uplift`) is watched the
same way by an :class:`UpliftWatcher`; :class:`ModelWatcher` polls both. Without one, or while
one fails to load, the propensity tiers decide.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from stream import uplift_model
from stream.metrics import Metrics
from stream.policy import ServingModel
from stream.uplift_model import UpliftModel

log = logging.getLogger(__name__)


class UpliftWatcher:
    """The uplift checkpoint at a path: loaded, and swapped when its version changes."""

    def __init__(self, path: str | Path | None, metrics: Metrics) -> None:
        self.path = Path(path) if path else None
        self.metrics = metrics
        self.model: UpliftModel | None = None
        self._failed_version: str | None = None

    def _published_version(self) -> str | None:
        assert self.path is not None
        try:
            return str(json.loads((self.path / uplift_model.MANIFEST).read_text())
                       ["model_version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def due(self) -> bool:
        """A version other than the serving (or last failed) one is published."""
        if self.path is None:
            return False
        published = self._published_version()
        serving = self.model.version if self.model is not None else None
        return published is not None and published not in (serving, self._failed_version)

    def load(self) -> bool:
        if self.path is None:
            return False
        try:
            model = uplift_model.load(self.path)
        except (uplift_model.CheckpointError, OSError) as exc:
            self._failed_version = self._published_version()
            self.metrics.encoder_failures.labels(stage="uplift_load").inc()
            log.error("cannot load uplift checkpoint %s: %s", self.path, exc,
                      extra={"serving": self.model.version if self.model else "none"})
            return False
        previous, self.model, self._failed_version = self.model, model, None
        log.info("uplift model loaded", extra={
            "uplift_version": model.version, "path": str(self.path),
            "previous": previous.version if previous else "none"})
        return True


class ModelWatcher:
    def __init__(self, path: str | Path | None, metrics: Metrics,
                 uplift_path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.metrics = metrics
        self._encoder: ServingModel | None = None
        self._failed_version: str | None = None
        self._uplift = UpliftWatcher(uplift_path, metrics)

    @property
    def encoder(self) -> ServingModel | None:
        return self._encoder

    @property
    def uplift(self) -> UpliftModel | None:
        return self._uplift.model

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
        """Load synchronously (at start-up); True if an encoder serves afterwards."""
        self._uplift.load()
        if self.path is None:
            log.warning("no checkpoint configured: deciding with fallbacks only")
            self.metrics.model_loaded.set(0)
            return False
        self._load()
        return self._encoder is not None

    async def poll(self) -> bool:
        """Swap in newer checkpoints if any were published; True if the encoder changed."""
        if self._uplift.due():
            await asyncio.to_thread(self._uplift.load)
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
