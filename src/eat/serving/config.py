"""Settings of the EAT service (one dataclass shared by the single-machine server and the Ray Serve deployment)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """Batching, limits and model settings of `eat serve`.

    max_batch: rows per batch. max_batch_tokens: padded tokens per batch (rows x longest row): cost grows with
    length, so a batch of long texts holds fewer rows. max_wait_ms: how long the oldest waiting row may wait for a
    batch to fill (0: a batch is whatever has arrived when the model is free; under load rows pile up while a batch
    runs, so batches still form). max_queue: rows waiting at most; beyond it a request is refused with 503 and
    Retry-After. max_rows_per_request / max_body_bytes: request limits (413 beyond them). max_length: tokens per
    row (longer texts are truncated, as `eat predict` does). retry_after_s: the Retry-After a refused request gets.
    """

    max_batch: int = 32
    max_batch_tokens: int = 4096
    max_wait_ms: float = 0.0
    max_queue: int = 1024
    max_rows_per_request: int = 64
    max_body_bytes: int = 1_000_000
    max_length: int = 128
    retry_after_s: int = 1

    def validate(self) -> "ServeConfig":
        """Raise ValueError naming the option when a setting cannot work; return self."""
        for name in ("max_batch", "max_batch_tokens", "max_queue", "max_rows_per_request", "max_body_bytes",
                     "max_length", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_batch_tokens < self.max_length:
            raise ValueError(f"--max-batch-tokens {self.max_batch_tokens} is below --max-length {self.max_length}: "
                             "a single long row would not fit in a batch")
        if self.max_queue < self.max_rows_per_request:
            raise ValueError(f"--max-queue {self.max_queue} is below --max-rows-per-request "
                             f"{self.max_rows_per_request}: a full-size request could never be accepted")
        return self


__all__ = ["ServeConfig"]
