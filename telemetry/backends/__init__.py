"""GPU backends: one protocol (``base.GpuBackend``), one module per implementation."""

from telemetry.backends.base import (
    READING_FIELDS,
    BackendCapabilities,
    BackendUnavailableError,
    GpuBackend,
    GpuCapabilities,
    GpuError,
    GpuInfo,
    GpuLostError,
    GpuNotFoundError,
    GpuPermissionError,
    GpuProcess,
    GpuReading,
    GpuTimeoutError,
    InvalidSettingError,
    NotSupportedError,
    ThrottleReason,
)

__all__ = [
    "READING_FIELDS",
    "BackendCapabilities",
    "BackendUnavailableError",
    "GpuBackend",
    "GpuCapabilities",
    "GpuError",
    "GpuInfo",
    "GpuLostError",
    "GpuNotFoundError",
    "GpuPermissionError",
    "GpuProcess",
    "GpuReading",
    "GpuTimeoutError",
    "InvalidSettingError",
    "NotSupportedError",
    "ThrottleReason",
]
