"""Keras training progress through the project's one progress display: a tqdm bar on stderr
per epoch (steps, rate, ETA, the latest loss), never Keras's own bar on stdout."""

from __future__ import annotations

import sys
from typing import Any

from extract.runtime import load_keras


def epoch_progress(desc: str) -> Any:
    """A Keras callback showing each epoch as a bar on stderr, with its metrics at the end."""
    keras = load_keras()
    from tqdm import tqdm

    class EpochProgress(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.bar: Any = None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            epochs = self.params.get("epochs")
            self.bar = tqdm(total=self.params.get("steps"), unit="step", file=sys.stderr,
                            desc=f"{desc} epoch {epoch + 1}/{epochs}", dynamic_ncols=True)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.bar is not None:
                self.bar.update(1)
                if logs and "loss" in logs:
                    self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if self.bar is not None:
                shown = {k: f"{float(v):.4f}" for k, v in (logs or {}).items()
                         if k in ("loss", "accuracy", "val_loss", "val_accuracy")}
                self.bar.set_postfix(shown, refresh=True)
                self.bar.close()
                self.bar = None

    return EpochProgress()
