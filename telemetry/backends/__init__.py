"""GPU backends: one protocol (``base.GpuBackend``), one module per implementation."""

from telemetry.backends.base import (
    BackendUnavailableError,
    GpuBackend,
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
    "BackendUnavailableError",
    "GpuBackend",
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
